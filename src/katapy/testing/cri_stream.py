"""A client for the CRI streaming server: Exec, Attach and PortForward over WebSocket, as kubectl does.

CRI ``Exec``/``Attach``/``PortForward`` answer a URL on containerd's streaming
server (k8s.io/kubelet/pkg/cri/streaming, which containerd 1.6 embeds).  That
server speaks SPDY and WebSocket; this client uses WebSocket with the
``v4.channel.k8s.io`` subprotocol (binary frames, the first byte of each
message names the channel):

* remote command (exec, attach): 0 stdin, 1 stdout, 2 stderr, 3 error (a JSON
  ``metav1.Status`` when the command ends: ``Success``, or ``Failure`` with
  reason ``NonZeroExitCode`` and the code in ``details.causes``), 4 resize
  (JSON ``{"Width": w, "Height": h}``).
* port forward: for the i-th requested port, channel 2i carries data and 2i+1
  errors; the server's first message on each channel is the port number
  (uint16, little endian).

The WebSocket protocol v4 has no way to half-close stdin (v5 added one), so a
test ends an interactive session by what it types (``exit``).
"""
from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field

import websocket

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
PROTOCOL = "v4.channel.k8s.io"


def _ws_url(url: str) -> str:
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    return url


def connect(url: str, timeout: float = 30.0) -> websocket.WebSocket:
    ws = websocket.create_connection(_ws_url(url), subprotocols=[PROTOCOL], timeout=timeout)
    if ws.getsubprotocol() != PROTOCOL:
        ws.close()
        raise RuntimeError(f"streaming server chose subprotocol {ws.getsubprotocol()!r}, not {PROTOCOL}")
    return ws


@dataclass
class CommandResult:
    stdout: bytes = b""
    stderr: bytes = b""
    status: dict = field(default_factory=dict)  # the error channel's metav1.Status ({} if none came)

    @property
    def exit_code(self) -> int | None:
        """0 on Success, the code of a NonZeroExitCode failure, None when the stream ended without a status."""
        if not self.status:
            return None
        if self.status.get("status") == "Success":
            return 0
        for cause in (self.status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                return int(cause.get("message", "-1"))
        return -1


class _Stream:
    """A WebSocket stream of the streaming server; closed at most once, from either side."""

    def __init__(self, url: str, timeout: float) -> None:
        self.ws = connect(url, timeout)
        self.closed = False

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self.closed = True


class RemoteCommand(_Stream):
    """One exec or attach session."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        super().__init__(url, timeout)
        self.result = CommandResult()

    def send(self, data: bytes) -> None:
        self.ws.send_binary(bytes([STDIN]) + data)

    def resize(self, width: int, height: int) -> None:
        self.ws.send_binary(bytes([RESIZE]) + json.dumps({"Width": width, "Height": height}).encode())

    def _take(self, timeout: float) -> bool:
        """Read one message into the result; False when the stream is closed."""
        if self.closed:
            return False
        self.ws.settimeout(timeout)
        try:
            opcode, data = self.ws.recv_data()
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            self.closed = True
            return False
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self.closed = True
            return False
        if not data:
            return True
        channel, payload = data[0], data[1:]
        if channel == STDOUT:
            self.result.stdout += payload
        elif channel == STDERR:
            self.result.stderr += payload
        elif channel == ERROR and payload:
            self.result.status = json.loads(payload)
        return True

    def read_until(self, marker: bytes, timeout: float = 60.0) -> bytes:
        """Read until ``marker`` shows in stdout (or stderr); the output so far.  TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while marker not in self.result.stdout and marker not in self.result.stderr:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{marker!r} not seen in {timeout}s; stdout={self.result.stdout[-500:]!r} "
                                   f"stderr={self.result.stderr[-500:]!r}")
            try:
                if not self._take(left):
                    raise EOFError(f"stream closed before {marker!r}; stdout={self.result.stdout[-500:]!r}")
            except websocket.WebSocketTimeoutException:
                continue
        return self.result.stdout

    def wait(self, timeout: float = 60.0) -> CommandResult:
        """Read until the server closes the stream (the command ended)."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"stream still open after {timeout}s; stdout={self.result.stdout[-500:]!r}")
            try:
                self._take(left)
            except websocket.WebSocketTimeoutException:
                continue
        self.close()
        return self.result


class PortForward(_Stream):
    """One forwarded connection to ``port`` of a pod (the URL's first and only port)."""

    def __init__(self, url: str, port: int, timeout: float = 30.0) -> None:
        super().__init__(url, timeout)
        self.port = port
        self._seen_port: set[int] = set()
        self.error = b""

    def send(self, data: bytes) -> None:
        self.ws.send_binary(bytes([0]) + data)

    def recv(self, timeout: float = 30.0) -> bytes:
        """The next data bytes from the pod's port; b"" when the stream closed."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no data from port {self.port} in {timeout}s (error channel: {self.error!r})")
            self.ws.settimeout(left)
            try:
                opcode, data = self.ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, ConnectionError):
                self.closed = True
                return b""
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.closed = True
                return b""
            if not data:
                continue
            channel, payload = data[0], data[1:]
            if channel not in self._seen_port:
                # the first message of each channel is the port number
                self._seen_port.add(channel)
                if len(payload) >= 2 and struct.unpack("<H", payload[:2])[0] == self.port:
                    payload = payload[2:]
                if not payload:
                    continue
            if channel == 1:
                self.error += payload
                continue
            if channel == 0 and payload:
                return payload

    def recv_all(self, timeout: float = 30.0) -> bytes:
        """Everything until the stream closes."""
        out = b""
        deadline = time.monotonic() + timeout
        while True:
            chunk = self.recv(max(0.1, deadline - time.monotonic()))
            if not chunk:
                return out
            out += chunk
