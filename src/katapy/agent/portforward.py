"""Port forwarding, the guest's end: a vsock connection from the shim becomes a TCP connection in the VM.

CRI PortForward (``kubectl port-forward``) makes containerd dial
``127.0.0.1:<port>`` in the pod netns on the host.  With katapy the listener
is in the guest, so the shim catches that connection
(``katapy.resource.network.portforward``) and opens one vsock stream per
connection to this agent's port-forward port (``PORT_FORWARD_PORT`` in
``katapy.protocol.portforward``, which ``katapy.agent.__main__`` listens on).
The VM's netns *is* the pod netns, so the agent dials ``127.0.0.1:<port>``
here, where the containers listen.

Wire protocol (``katapy.protocol.portforward``), one exchange at the start of
each stream, then raw bytes:

    host  -> agent   b"PORT <n>\\n"             n in 1..65535, decimal, at most REQUEST_MAX bytes
    agent -> host    b"OK\\n" | b"ERR <why>\\n"  one line, at most STATUS_MAX bytes

After ``OK`` bytes flow both ways; each side ends its direction with
shutdown(SHUT_WR), so a client that half-closes (HTTP/1.0, ``nc -N``) still
reads the whole reply.  ``ERR`` is followed by a close: the shim then resets
containerd's connection, which reports the error on the stream's error
channel.  Garbage, a slow or over-long header, an out-of-range port and too
many connections each get an ``ERR`` line, never a crash: the host's input is
trusted, but the agent is PID 1.

Standard library only; the request and status helpers live in
``katapy.protocol.portforward``, which the shim imports too, so both ends
speak one definition.
"""
from __future__ import annotations

import socket
import threading

from katapy.agent import log
from katapy.agent.acceptor import Acceptor
from katapy.protocol.portforward import REQUEST_MAX, RequestError, parse_request, status_line

LOOPBACK = "127.0.0.1"
MAX_CONNECTIONS = 64
SETUP_TIMEOUT_S = 10.0  # the header, and the TCP connect to the container's port
CHUNK = 64 * 1024


def _read_line(conn: socket.socket, limit: int) -> bytes:
    """One request line, byte by byte so that nothing after it is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        if len(line) >= limit:
            raise RequestError(f"request longer than {limit} bytes: {line!r}")
        byte = conn.recv(1)
        if not byte:
            raise RequestError(f"the host closed the stream inside the request ({line!r})")
        line += byte
    return line


def dial(port: int, timeout: float = SETUP_TIMEOUT_S) -> socket.socket:
    """A TCP connection to ``127.0.0.1:port`` in the VM's (the pod's) netns; OSError as connect(2) fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((LOOPBACK, port))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def _abort(*socks: socket.socket) -> None:
    """End both directions of every socket, waking the thread that copies the other way."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """One direction: ``src`` to ``dst`` until EOF, then shutdown(SHUT_WR) on ``dst``; an error aborts both."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        _abort(src, dst)


def splice(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until both directions have ended (this thread a->b, a helper b->a)."""
    back = threading.Thread(target=_copy, args=(b, a), name="port-forward-copy", daemon=True)
    back.start()
    _copy(a, b)
    back.join()


def handle(conn: socket.socket) -> None:
    """Serve one forwarded stream from the host; always closes ``conn``."""
    target: socket.socket | None = None
    port = 0
    try:
        conn.settimeout(SETUP_TIMEOUT_S)
        try:
            port = parse_request(_read_line(conn, REQUEST_MAX))
            target = dial(port)
        except RequestError as exc:
            _refuse(conn, str(exc), port)
            return
        except OSError as exc:  # the header timed out, or connect(2) failed
            what = f"connect {LOOPBACK}:{port}" if port else "request"
            _refuse(conn, f"{what}: {exc.strerror or exc}", port)
            return
        conn.sendall(status_line())
        conn.settimeout(None)
        log.debug("port forward connected", port=port)
        splice(conn, target)
    except OSError as exc:
        log.info("port forward ended", port=port, error=str(exc))
    finally:
        if target is not None:
            target.close()
        conn.close()


def _refuse(conn: socket.socket, why: str, port: int = 0) -> None:
    log.info("port forward refused", port=port, reason=why)
    try:
        conn.sendall(status_line(why))
    except OSError:
        pass


class Forwarder(Acceptor):
    """The accept loop on the port-forward vsock listener: one thread per stream, at most ``max_connections``."""

    name = "port-forward"

    def __init__(self, listener: socket.socket, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(listener, max_connections)

    def handle(self, conn: socket.socket) -> None:
        handle(conn)

    def refuse(self, conn: socket.socket) -> None:
        conn.settimeout(SETUP_TIMEOUT_S)
        _refuse(conn, "too many port-forward connections")
