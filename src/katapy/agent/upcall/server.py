"""The upcall server: one VMM connection at a time on vsock port 0xDB (docs/protocols.md §8).

After accept: read the service byte (``d``, the device manager; anything else
closes the connection), send the CONNECT greeting, then answer each 0x400-byte
request with one 0x400-byte reply.  A message that breaks the wire format
closes the connection (the stream cannot be trusted to be in step any more);
the VMM reconnects.  A handler never takes the server down: an unexpected
exception is answered EIO and logged.
"""
from __future__ import annotations

import errno
import socket
import threading
from typing import Any, Callable

from katapy.upcall import wire

from .memory import MemoryHotplugFailed, MemorySysfs, add_memory, remove_memory


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class UpcallServer:
    def __init__(self, listener: socket.socket, memory: MemorySysfs | None = None,
                 log: Callable[..., Any] | None = None) -> None:
        self.listener = listener
        self.memory = memory or MemorySysfs()
        self._log = log or (lambda *a, **k: None)

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            with conn:
                try:
                    self.serve_connection(conn)
                except OSError as exc:
                    self._log("upcall connection ended", error=str(exc))

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="upcall", daemon=True)
        t.start()
        return t

    def serve_connection(self, conn: socket.socket) -> None:
        service = _recv_exactly(conn, 1)
        if service != wire.DEV_MGR_SERVICE:
            self._log("upcall: unknown service", service=repr(service))
            return
        conn.sendall(wire.connect_greeting())
        while True:
            buf = _recv_exactly(conn, wire.MSG_SIZE)
            if buf is None:
                return
            try:
                req = wire.decode_request(buf)
            except wire.UpcallProtocolError as exc:
                self._log("upcall: bad message, closing", error=str(exc))
                return
            conn.sendall(wire.encode_reply(self.handle(req)))

    def handle(self, req: wire.Request) -> wire.Reply:
        p = req.payload
        try:
            if req.type is wire.MsgType.ADD_MEM and isinstance(p, wire.MemRequest):
                add_memory(self.memory, p.base, p.size)
            elif req.type is wire.MsgType.DEL_MEM and isinstance(p, wire.MemRequest):
                remove_memory(self.memory, p.base, p.size)
            else:
                return wire.Reply(req.type, -errno.ENOTSUP)
        except MemoryHotplugFailed as exc:
            self._log("upcall request refused", type=req.type.name, error=str(exc))
            return wire.Reply(req.type, -exc.errno)
        except Exception as exc:  # never take the server down
            self._log("upcall handler failed", type=req.type.name, error=repr(exc))
            return wire.Reply(req.type, -errno.EIO)
        self._log("upcall request done", type=req.type.name)
        return wire.Reply(req.type, 0)


def serve_vsock(log: Callable[..., Any]) -> None:
    """Listen on (VMADDR_CID_ANY, 0xDB) and serve in a daemon thread."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind((socket.VMADDR_CID_ANY, wire.UPCALL_PORT))
    sock.listen(1)
    UpcallServer(sock, log=log).start()
