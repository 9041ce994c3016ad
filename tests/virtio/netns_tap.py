"""A tap in a network namespace made by a test, and a TCP sink listening there (virtio-net tests)."""
from __future__ import annotations

import socket
import subprocess
import threading


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make_tap(ns: str, tap: str, host_ip: str) -> None:
    """``ip netns add ns`` plus a vnet_hdr tap ``tap`` holding ``host_ip``/24, up (the caller deletes ``ns``)."""
    ip("netns", "add", ns)
    ip("-n", ns, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
    ip("-n", ns, "addr", "add", f"{host_ip}/24", "dev", tap)
    ip("-n", ns, "link", "set", tap, "up")


class TcpSink:
    """Accepts one TCP connection on ``host_ip:port`` inside ``ns`` and keeps every byte it sends."""

    def __init__(self, ns: str, host_ip: str, port: int, timeout: float = 120.0) -> None:
        from katapy.resource.network.netns import run_in_netns

        def listener() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host_ip, port))
            s.listen(1)
            s.settimeout(timeout)
            return s

        self.received = bytearray()
        self._server = run_in_netns(f"/var/run/netns/{ns}", listener)
        self._timeout = timeout
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(self._timeout)
            while chunk := conn.recv(65536):
                self.received.extend(chunk)

    def close(self, wait: float = 60.0) -> bytes:
        """Wait for the sender to finish (up to ``wait`` s), stop listening; what arrived."""
        self._thread.join(wait)
        self._server.close()
        return bytes(self.received)
