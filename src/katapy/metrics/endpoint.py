"""The shim's metrics endpoint: HTTP/1.1 ``GET /metrics`` on a unix socket, served by its own threads.

Kata's shim answers ``/metrics`` on its shim-monitor socket; katapy's socket is
``<sandbox dir>/metrics.sock`` (mode 0600: the state directory is root's).
Threads, not the shim's trio loop: a scrape must not wait behind a busy
ttrpc request, and a slow or stuck client (each connection has
:data:`CLIENT_TIMEOUT_S`) must not hold up anything else.  ``render`` is
called per request and must itself be bounded (reading attributes and procfs).
"""
from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from katapy import log

_log = log.get("metrics.endpoint")

SOCKET_NAME = "metrics.sock"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text format
CLIENT_TIMEOUT_S = 5.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing left open between scrapes
    timeout = CLIENT_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = self.server.render()
        except Exception as exc:  # a bug in a collector is a 500, not a dead endpoint
            _log.error("metrics collection failed", error=repr(exc))
            self.send_error(500, f"collection failed: {exc!r}")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:  # AF_UNIX peers have no address
        return "unix"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        _log.debug("metrics request", line=format % args)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, render: Callable[[], bytes]) -> None:
        self.render = render
        super().__init__(path, _Handler)


class MetricsEndpoint:
    """``start()`` binds ``path`` and serves until ``close()``, which also removes the socket."""

    def __init__(self, path: Path, render: Callable[[], bytes]) -> None:
        self.path = path
        self._render = render
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            self._server = _Server(str(self.path), self._render)
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="katapy-metrics", daemon=True)
        self._thread.start()
        _log.info("metrics endpoint serving", socket=str(self.path))

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
        self.path.unlink(missing_ok=True)


def fetch(path: Path, timeout: float) -> bytes:
    """``GET /metrics`` from the endpoint at ``path``: the body, or OSError/ValueError within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: katapy\r\n\r\n")
        chunks = []
        while True:  # one deadline for the whole answer: an endpoint that dribbles is cut off too
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"metrics endpoint {path}: no complete answer within {timeout} s")
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or status[1] != b"200":
        raise ValueError(f"metrics endpoint {path}: {head[:200]!r}")
    return body
