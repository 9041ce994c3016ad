"""A TCP server on 127.0.0.1 of the caller's netns for port-forwarding tests.

It replies ``echo:<everything it got>`` only once the client half-closed
(shutdown(SHUT_WR)), so a forwarder that does not carry the half-close on
gets no reply at all.
"""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def echo_server() -> Iterator[tuple[int, list[bytes]]]:
    """(port, what each connection sent, in order); the server thread ends when the block does."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    got: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                got.append(data)
                conn.sendall(b"echo:" + data)

    t = threading.Thread(target=serve, name="tcp-echo", daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[1], got
    finally:
        lsock.shutdown(socket.SHUT_RDWR)  # wakes accept(2); close alone would not
        lsock.close()
        t.join(5)
