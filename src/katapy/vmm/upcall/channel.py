"""The VMM's end of the dbs-upcall channel: one blocking, strictly request/response stream to the guest.

Protocol (Kata ``src/dragonball/crates/dbs_upcall/src/lib.rs``; docs/protocols.md
"upcall"; wire format in :mod:`katapy.upcall.wire`):

1. hybrid-vsock handshake to guest port 0xDB (219): ``CONNECT 219\\n`` on the
   VMM's unix socket, a reply line starting with ``OK``;
2. one service byte, ``b"d"`` (device manager);
3. the guest's CONNECT greeting, one 0x400-byte message, validated;
4. then the VMM writes one 0x400-byte request and reads one 0x400-byte reply
   of the same ``msg_type``; only one request is ever in flight.

Upstream's client retries the connection every 10 ms, up to 500 tries; here
the channel retries every :data:`RETRY_INTERVAL_S` while nothing listens on the
guest port (the VMM closes the stream before answering ``CONNECT``), until
``connect_timeout``.  Any other connect failure is final at once.

Concurrency: one request in flight, enforced by a lock.  A second caller waits
for the lock, at most its own request timeout, and then gets
:class:`UpcallBusy` without anything having been sent.  A request that got the
lock gets its full timeout for the guest's answer.

Connection state: a refusal (``ret < 0``, :class:`UpcallRefused`) keeps the
connection; a timeout, a lost connection or a garbage reply drops it (a late
or partial answer would desynchronise the stream) and the next request
reconnects.  Requests are not retried after they were sent (hot-plug is not
idempotent); an idle connection found closed, or carrying bytes nobody asked
for, *before* a request is sent is replaced silently.  Every failure path
closes its socket.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from katapy import log
from katapy.upcall import wire
from katapy.vmm.upcall import hybrid
from katapy.vmm.upcall.errors import (
    UpcallBusy,
    UpcallClosed,
    UpcallConnectError,
    UpcallConnectionLost,
    UpcallProtocolError,
    UpcallRefused,
    UpcallTimeout,
    describe,
)

_log = log.get("vmm.upcall")

#: pause between connect tries while the guest's upcall server is not listening (upstream: 10 ms)
RETRY_INTERVAL_S = 0.010
CPU_TYPES = (wire.MsgType.ADD_CPU, wire.MsgType.DEL_CPU)


class _ShortRead(Exception):
    def __init__(self, got: int) -> None:
        super().__init__(got)
        self.got = got


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Exactly ``n`` bytes by ``deadline``; TimeoutError past it, :class:`_ShortRead` at EOF."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        k = sock.recv_into(view[got:])
        if k == 0:
            raise _ShortRead(got)
        got += k
    return bytes(buf)


class UpcallChannel:
    """A lazily connected dbs-upcall stream through the VMM's hybrid-vsock socket ``uds_path``.

    ``connect_timeout`` bounds setting up the channel (the retries while the
    guest's listener is missing, the handshake, the greeting);
    ``request_timeout`` bounds the guest's answer to one request, and also how
    long a caller waits for another's request to finish.  ``port`` is the
    guest's upcall port (the guest server's ``@<port>`` override; default 219).
    Thread-safe; usable as a context manager (``close`` on exit).
    """

    def __init__(self, uds_path: Path, *, connect_timeout: float = 5.0, request_timeout: float = 10.0,
                 port: int = wire.UPCALL_PORT, retry_interval: float = RETRY_INTERVAL_S) -> None:
        self.uds_path = Path(uds_path)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.port = port
        self.retry_interval = retry_interval
        self._lock = threading.Lock()  # held for a whole request (or connect): one in flight
        self._state = threading.Lock()  # guards _sock and _closed against close() from another thread
        self._sock: socket.socket | None = None
        self._closed = False
        self._inflight = ""

    # -- public ---------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Set up the channel now, if not already up (``request`` does it lazily).

        Raises :class:`UpcallConnectError`, :class:`UpcallProtocolError` (a bad
        greeting), :class:`UpcallBusy` or :class:`UpcallClosed`.
        """
        what = "connect"
        if not self._lock.acquire(timeout=self.connect_timeout):
            raise UpcallBusy(f"upcall connect: {self._inflight} still in flight after {self.connect_timeout:g}s")
        try:
            self._ensure_connected(what, None)
        finally:
            self._release()

    def request(self, req: wire.Request, *, timeout: float | None = None) -> wire.Reply:
        """Send ``req`` and return the guest's reply (``ret == 0``); ``timeout`` overrides ``request_timeout``.

        A request the wire format cannot encode raises wire's
        ``UpcallProtocolError`` (a ``ValueError``) before anything is sent.
        ``ret < 0`` raises :class:`UpcallRefused`; see the module docstring for
        the other errors.
        """
        t = self.request_timeout if timeout is None else timeout
        data = wire.encode_request(req)
        what = describe(req)
        if not self._lock.acquire(timeout=t):
            raise UpcallBusy(f"upcall {what}: {self._inflight or 'another request'} still in flight "
                             f"after {t:g}s; not sent", request=req)
        try:
            self._inflight = what
            sock = self._ensure_connected(what, req)
            reply = self._exchange(sock, req, data, t, what)
        finally:
            self._release()
        if reply.ret < 0:
            raise UpcallRefused(req, -reply.ret, reply.cpu_index if req.type in CPU_TYPES else None)
        return reply

    def close(self) -> None:
        """Close the channel for good.  A request waiting for its reply is woken at once (:class:`UpcallClosed`)."""
        with self._state:
            self._closed = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._lock.acquire(blocking=False):
            try:
                self._drop()
            finally:
                self._lock.release()
        # else: the request in flight drops the socket when it releases the lock

    def __enter__(self) -> UpcallChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called with _lock held) ----------------------------------------
    def _release(self) -> None:
        self._inflight = ""
        if self._closed:
            self._drop()
        self._lock.release()

    def _check_open(self, what: str, req: wire.Request | None, sent: bool = False) -> None:
        if self._closed:
            raise UpcallClosed(f"upcall {what}: the channel is closed" + (" while the request was in flight"
                                                                         if sent else ""), request=req, sent=sent)

    def _drop(self) -> None:
        with self._state:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _ensure_connected(self, what: str, req: wire.Request | None) -> socket.socket:
        self._check_open(what, req)
        sock = self._sock
        if sock is not None and _stale(sock):
            _log.info("upcall connection found closed or out of step while idle; reconnecting",
                      uds=str(self.uds_path))
            self._drop()
            sock = None
        if sock is None:
            sock = self._open(what, req)
            with self._state:
                if self._closed:
                    sock.close()
                    raise UpcallClosed(f"upcall {what}: the channel was closed while connecting", request=req)
                self._sock = sock
        return sock

    def _open(self, what: str, req: wire.Request | None) -> socket.socket:
        """Handshake (retried while the guest port is not listening), service byte, greeting."""
        where = f"upcall {what}: guest vsock port {self.port} via {self.uds_path}"
        deadline = time.monotonic() + self.connect_timeout
        tries = 0
        while True:
            self._check_open(what, req)
            tries += 1
            try:
                sock = hybrid.dial(self.uds_path, self.port, max(deadline - time.monotonic(), 0.001))
                break
            except hybrid.GuestPortNotListening as exc:
                if time.monotonic() + self.retry_interval >= deadline:
                    raise UpcallConnectError(
                        f"{where}: nothing listened after {self.connect_timeout:g}s ({tries} tries; "
                        f"does the guest kernel have the dbs-upcall server?): {exc.strerror}", request=req) from None
                time.sleep(self.retry_interval)
            except hybrid.HybridVsockError as exc:
                raise UpcallConnectError(f"{where}: {exc.strerror}", request=req) from None
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(wire.DEV_MGR_SERVICE)
            buf = _recv_exact(sock, wire.MSG_SIZE, deadline)
            wire.decode_reply(buf, wire.MsgType.CONNECT)
        except TimeoutError:
            sock.close()
            raise UpcallConnectError(f"{where}: no CONNECT greeting within {self.connect_timeout:g}s",
                                     request=req) from None
        except _ShortRead as exc:
            sock.close()
            raise UpcallConnectError(f"{where}: the guest closed the connection after {exc.got} bytes of its "
                                     f"CONNECT greeting (no device-manager service?)", request=req) from None
        except wire.UpcallProtocolError as exc:
            sock.close()
            raise UpcallProtocolError(f"{where}: bad CONNECT greeting: {exc}", request=req) from exc
        except OSError as exc:
            sock.close()
            raise UpcallConnectError(f"{where}: connection lost before the greeting: {exc.strerror or exc}",
                                     request=req) from None
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        if tries > 1:
            _log.info("upcall connected", uds=str(self.uds_path), port=self.port, tries=tries)
        return sock

    def _exchange(self, sock: socket.socket, req: wire.Request, data: bytes, t: float, what: str) -> wire.Reply:
        deadline = time.monotonic() + t
        try:
            try:
                sock.settimeout(t)
                sock.sendall(data)
                buf = _recv_exact(sock, wire.MSG_SIZE, deadline)
            except TimeoutError:
                raise UpcallTimeout(f"upcall {what}: the guest did not answer within {t:g}s; connection dropped",
                                    request=req, sent=True) from None
            except _ShortRead as exc:
                self._check_open(what, req, sent=True)
                raise UpcallConnectionLost(f"upcall {what}: the guest closed the connection after {exc.got} of "
                                           f"{wire.MSG_SIZE} reply bytes", request=req, sent=True) from None
            except OSError as exc:
                self._check_open(what, req, sent=True)
                raise UpcallConnectionLost(f"upcall {what}: connection lost: {exc.strerror or exc}",
                                           request=req, sent=True) from exc
            try:
                return wire.decode_reply(buf, req.type)
            except wire.UpcallProtocolError as exc:
                raise UpcallProtocolError(f"upcall {what}: bad reply from the guest: {exc}; connection dropped",
                                          request=req, sent=True) from exc
        except BaseException:
            self._drop()
            raise


def _stale(sock: socket.socket) -> bool:
    """An idle connection that is closed, reset, or holds bytes no request asked for."""
    try:
        sock.settimeout(0.0)  # with a timeout set, recv would first wait for readability
        return len(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)) >= 0
    except BlockingIOError:
        return False
    except OSError:
        return True
