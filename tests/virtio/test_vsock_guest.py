"""Acceptance: hybrid vsock to a real Linux guest (katapy's VsockDevice over vhost-user to QEMU TCG, or on the
built-in VMM's virtio-mmio transport; see conftest.py)."""
from __future__ import annotations

import os
import socket
import threading
import time
import zlib

import pytest

from .conftest import Guest, _read_all

pytestmark = [pytest.mark.guest, pytest.mark.slow]

BIG = 64 << 20


def test_echo_via_connect(guest: Guest):
    s = guest.command("echo")
    s.sendall(b"hello katapy\n")
    assert s.recv(100) == b"hello katapy\n"
    s.shutdown(socket.SHUT_WR)
    assert _read_all(s) == b""
    s.close()


def test_connect_to_port_nobody_listens_on_closes_stream(guest: Guest):
    with pytest.raises(ConnectionRefusedError):
        guest.connect(port=4999)


def test_bad_connect_line_is_refused(guest: Guest):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(guest.vsock_uds))
    s.sendall(b"HELLO there\n")
    assert s.recv(10) == b""
    s.close()


def _report_rate(guest: Guest, what: str, n: int, seconds: float) -> None:
    print(f"[{guest.transport}] vsock {what}: {n >> 20} MiB in {seconds:.1f} s = {n / seconds / (1 << 20):.1f} MiB/s")


def test_64mib_host_to_guest(guest: Guest):
    s = guest.command("sink", timeout=600)
    block = os.urandom(1 << 20)
    crc = 0
    t0 = time.monotonic()
    for _ in range(BIG // len(block)):
        s.sendall(block)
        crc = zlib.crc32(block, crc)
    s.shutdown(socket.SHUT_WR)
    count, guest_crc = _read_all(s).decode().split()
    _report_rate(guest, "host->guest", BIG, time.monotonic() - t0)
    s.close()
    assert int(count) == BIG
    assert int(guest_crc, 16) == crc


def test_64mib_guest_to_host(guest: Guest):
    s = guest.command(f"source {BIG} 12345", timeout=600)
    crc, total = 0, 0
    t0 = time.monotonic()
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        crc = zlib.crc32(b, crc)
        total += len(b)
    _report_rate(guest, "guest->host", total, time.monotonic() - t0)
    s.close()
    assert total == BIG
    assert (total, crc) == _guest_crc(guest, BIG, 12345)


def _guest_crc(guest: Guest, n: int, seed: int) -> tuple[int, int]:
    s = guest.command(f"crc {n} {seed}", timeout=600)
    count, crc = _read_all(s).decode().split()
    s.close()
    return int(count), int(crc, 16)


def test_guest_initiated_connection(guest: Guest, tmp_path):
    """The guest connects to host port 7000 -> katapy dials <uds>_7000."""
    path = f"{guest.vsock_uds}_7000"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(60)
    n, seed = 4 << 20, 99
    received = {}

    def host_side():
        c, _ = srv.accept()
        c.settimeout(60)
        crc, total = 0, 0
        while True:
            b = c.recv(1 << 16)
            if not b:
                break
            crc, total = zlib.crc32(b, crc), total + len(b)
        received["v"] = (total, crc)
        c.sendall(b"thanks %d\n" % total)
        c.close()

    t = threading.Thread(target=host_side)
    t.start()
    try:
        s = guest.command(f"connect 7000 {n} {seed}", timeout=120)
        reply = _read_all(s)
        s.close()
        t.join(60)
        assert reply == b"thanks %d\n" % n
        assert received["v"] == _guest_crc(guest, n, seed)
    finally:
        srv.close()
        os.unlink(path)


def test_guest_connect_to_absent_host_port_is_reset(guest: Guest):
    s = guest.command("connect 7001 10 1", timeout=60)
    assert b"connect failed" in _read_all(s)
    s.close()


def test_32_concurrent_connections(guest: Guest):
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            s = guest.command("echo", timeout=120)
            data = os.urandom(256 * 1024 + i)
            sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
            sender.start()
            got = _read_all(s)
            sender.join()
            s.close()
            if got != data:
                errors.append(f"conn {i}: {len(got)} bytes back, expected {len(data)}")
        except Exception as e:  # collected and asserted below
            errors.append(f"conn {i}: {e!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors


def test_non_reading_guest_connection_does_not_stall_others(guest: Guest):
    stalled = guest.command("stall")
    stalled.setblocking(False)
    pushed = 0
    deadline = time.monotonic() + 20
    # fill the stalled connection until the host socket buffer pushes back
    while time.monotonic() < deadline:
        try:
            pushed += stalled.send(b"x" * 65536)
        except BlockingIOError:
            break
    assert pushed > 0
    t0 = time.monotonic()
    s = guest.command("echo")
    s.sendall(b"still alive\n")
    assert s.recv(100) == b"still alive\n"
    s.close()
    assert time.monotonic() - t0 < 10
    stalled.close()
