"""One accept loop for the agent's side services (port forwarding, the debug console).

Each accepted stream gets a thread of its own, at most ``max_connections`` at
once; one over the limit is handed to :meth:`Acceptor.refuse` and closed.  An
accept(2) that fails (EMFILE, ENOMEM) is logged and retried after a pause, so
a starved agent does not spin; closing the listener ends the loop.  Standard
library only: the agent imports this at start-up.
"""
from __future__ import annotations

import socket
import threading
import time

from katapy.agent import log

ACCEPT_BACKOFF_S = 0.1


class Acceptor:
    """Subclasses give :meth:`handle` (one stream, in its own thread) and :meth:`refuse`."""

    name = "acceptor"

    def __init__(self, listener: socket.socket, max_connections: int) -> None:
        self.listener = listener
        self._slots = threading.BoundedSemaphore(max_connections)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve, name=self.name, daemon=True)
        t.start()
        return t

    def serve(self) -> None:
        """Accept until the listener is closed."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:
                if self.listener.fileno() < 0:
                    return
                log.warning("accept failed", service=self.name, error=str(exc))
                time.sleep(ACCEPT_BACKOFF_S)
                continue
            if not self._slots.acquire(blocking=False):
                try:
                    self.refuse(conn)
                finally:
                    conn.close()
                continue
            threading.Thread(target=self._run, args=(conn,), name=f"{self.name}-conn", daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        finally:
            self._slots.release()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def refuse(self, conn: socket.socket) -> None:
        """Tell the peer it is one too many (the stream is closed after)."""
