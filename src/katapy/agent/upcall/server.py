"""The agent's upcall server: the guest end of dbs-upcall's device-manager channel.

Protocol (``katapy.upcall.wire``; Kata ``dbs_upcall`` and its guest patch
``0003-upcall-add-device-manager-service``; docs/protocols.md §8):

1. The VMM connects to guest vsock port :data:`UPCALL_PORT` (0xDB) and writes
   one service byte; only ``b"d"`` (device manager) is served, anything else
   closes the connection.
2. The guest answers at once with the CONNECT greeting (0x400 bytes).
3. Then strictly one request, one reply, each exactly 0x400 bytes.  The reply
   repeats the request's type with ``ret`` 0 or a negative errno.

Decisions this module makes:

* **One connection at a time; the newest wins.**  The VMM re-dials after it
  loses a connection (a timeout on its side, say), so a new connection shuts
  the old one down.  Requests from any connection run one at a time: a new
  connection's first request waits for the old one's handler to finish, and
  that handler's reply is dropped with the old connection.
* **Garbage closes the connection, with no reply.**  A short message, a wrong
  magic, unknown flags or type, a payload size that does not fit the type
  (``wire.UpcallProtocolError``), a PCI request, or a CONNECT after the
  greeting: the stream may be out of step, and a reply could be paired with
  the wrong request.  The VMM treats a lost connection as "the guest may
  have acted"; here it did not act.  The listener keeps accepting.
* **Handlers never kill the loop.**  An exception from a handler, or a reply
  that cannot be encoded, becomes ``ret = -EIO`` with an error log line.

Start-up cost: this module imports only socket, threading and errno; the wire
format and the handlers are imported when the VMM first connects.
"""
from __future__ import annotations

import errno
import socket
import threading
import time
from typing import TYPE_CHECKING

from katapy.agent import log

if TYPE_CHECKING:
    from collections.abc import Callable

    from katapy.upcall.wire import Reply, Request

    Handler = Callable[[Request], Reply]

#: guest vsock port the VMM dials (== ``katapy.upcall.wire.UPCALL_PORT``; kept here so
#: starting the server does not import the wire module)
UPCALL_PORT = 0xDB
ACCEPT_BACKOFF_S = 0.1  # after accept(2) fails (EMFILE, ENOMEM): do not spin
_MAX_ERRNO = 4095  # ret is -1..-4095 on failure (the kernel's MAX_ERRNO)


def recv_exact(conn: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``conn``, or fewer if the peer closed first."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:])
        if n == 0:
            break
        got += n
    return bytes(buf[:got])


def _shutdown(sock: socket.socket) -> None:
    """Wake whatever thread blocks on ``sock`` (that thread closes it)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class UpcallServer:
    """Serves upcall connections accepted on ``listener`` with ``handler`` (default: the device manager)."""

    def __init__(self, listener: socket.socket, handler: Handler | None = None) -> None:
        self.listener = listener
        self._handler = handler
        self._requests = threading.Lock()  # one request at a time, across connections
        self._conn_lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._stopped = False

    def start(self) -> threading.Thread:
        """Serve from a daemon thread; returns it."""
        thread = threading.Thread(target=self.serve, name="upcall", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """End the accept loop and the current connection (the listener's owner closes the listener)."""
        self._stopped = True
        _shutdown(self.listener)
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            _shutdown(conn)

    def serve(self) -> None:
        """Accept until :meth:`stop` or the listener is closed; each connection replaces the previous one."""
        while not self._stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:
                if self._stopped or self.listener.fileno() < 0:
                    return
                log.warning("upcall: accept failed", error=str(exc))
                time.sleep(ACCEPT_BACKOFF_S)
                continue
            if self._stopped:
                conn.close()
                return
            with self._conn_lock:
                old, self._conn = self._conn, conn
            if old is not None:
                log.info("upcall: a new connection replaces the current one")
                _shutdown(old)
            threading.Thread(target=self._run, args=(conn,), name="upcall-conn", daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.serve_connection(conn)
        except OSError as exc:
            log.info("upcall: connection ended", error=str(exc))
        finally:
            with self._conn_lock:
                if self._conn is conn:
                    self._conn = None
            conn.close()

    def serve_connection(self, conn: socket.socket) -> None:
        """One VMM connection: service byte, greeting, then requests until EOF or garbage (caller closes)."""
        service = recv_exact(conn, 1)
        if service != b"d":  # wire.DEV_MGR_SERVICE, compared before the wire module is imported
            if service:
                log.warning("upcall: unknown service byte, closing", service=repr(service))
            return
        from katapy.upcall import wire

        conn.sendall(wire.connect_greeting())
        log.info("upcall: VMM connected")
        while True:
            buf = recv_exact(conn, wire.MSG_SIZE)
            if len(buf) < wire.MSG_SIZE:
                if buf:
                    log.warning("upcall: connection closed inside a message", got=len(buf))
                else:
                    log.info("upcall: VMM closed the connection")
                return
            try:
                req = wire.decode_request(buf)
                if req.type is wire.MsgType.CONNECT:
                    raise wire.UpcallProtocolError("CONNECT after the greeting")
            except wire.UpcallProtocolError as exc:
                log.warning("upcall: protocol error, closing the connection", error=str(exc))
                return
            conn.sendall(self._answer(req))

    def _answer(self, req: Request) -> bytes:
        """The encoded reply to ``req``: the handler's, or ``-EIO`` when it raises or returns nonsense."""
        from katapy.upcall import wire

        with self._requests:
            try:
                if self._handler is None:
                    from katapy.agent.upcall.handlers import DeviceManager

                    self._handler = DeviceManager()
                reply = self._handler(req)
                if not (isinstance(reply, wire.Reply) and reply.type is req.type
                        and isinstance(reply.ret, int) and -_MAX_ERRNO <= reply.ret <= 0):
                    raise TypeError(f"handler returned {reply!r}")
                data = wire.encode_reply(reply)
            except Exception as exc:  # noqa: BLE001 - PID 1: a bug in one handler must not end the channel
                import traceback

                log.error("upcall: handler failed", type=req.type.name, error=repr(exc),
                          traceback=traceback.format_exc())
                reply = wire.Reply(req.type, -errno.EIO)
                data = wire.encode_reply(reply)
        log.debug("upcall: reply", type=req.type.name, ret=reply.ret, cpu_index=reply.cpu_index)
        return data
