"""Hybrid vsock host side: guest vsock streams <-> host unix sockets (Firecracker/Dragonball design).

* Host-initiated: a unix listener at ``uds_path``.  A client writes
  ``CONNECT <port>\\n``; we send REQUEST to the guest from a fresh host port
  (from 1<<30); on RESPONSE we write ``OK <hostport>\\n`` and bytes flow raw.
  RST, a timeout or a bad command closes the unix stream.
* Guest-initiated: a REQUEST to host port P connects to ``<uds_path>_<P>``;
  RST if nobody listens there.

The muxer is the only part that knows unix sockets; the device only hands it
TX packets and asks it for RX packets.  All methods run on the device's event
loop thread.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections import deque
from typing import Callable

from katapy import log
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.virtio.vsock.connection import Connection, State
from katapy.vmm.virtio.vsock.packet import (
    KNOWN_OPS, OP_REQUEST, OP_RESPONSE, OP_RST, TYPE_STREAM, VSOCK_HOST_CID, Header, Packet,
)
from katapy.vmm.virtio.vsock.timer import TimerFd

_log = log.get("vmm.virtio.vsock")

FIRST_HOST_PORT = 1 << 30
MAX_CONNECTIONS = 1024
MAX_PENDING_RSTS = 256
CONNECT_LINE_MAX = 32
CONNECT_TIMEOUT_S = 10.0
TICK_S = 0.25


class _PendingHostStream:
    """An accepted unix stream that has not yet sent its ``CONNECT <port>\\n`` line."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline = time.monotonic() + CONNECT_TIMEOUT_S


class VsockMuxer:
    def __init__(self, uds_path: str):
        self.uds_path = uds_path
        self.guest_cid = 0
        if os.path.exists(uds_path):
            os.unlink(uds_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.listener.bind(uds_path)
        self.listener.listen(128)
        self.loop: EventLoop | None = None
        self._notify_rx: Callable[[], None] = lambda: None
        self.conns: dict[tuple[int, int], Connection] = {}
        self._by_fd: dict[int, Connection] = {}
        self._events: dict[int, int] = {}  # fd -> events registered with the loop
        self._pending: dict[int, _PendingHostStream] = {}
        self._rx_work: deque[Connection] = deque()
        self._rsts: deque[Header] = deque()
        self._next_port = FIRST_HOST_PORT - 1
        self._timer: TimerFd | None = None

    # -- life cycle -----------------------------------------------------------
    def activate(self, loop: EventLoop, guest_cid: int, notify_rx: Callable[[], None]) -> None:
        self.loop, self.guest_cid, self._notify_rx = loop, guest_cid, notify_rx
        self._timer = TimerFd()
        loop.add(self._timer.fd, self._on_tick)
        loop.add(self.listener.fileno(), self._on_accept)

    def reset(self) -> None:
        """Drop every connection (the guest driver reset); keep listening."""
        loop = self.loop
        if loop is not None:
            loop.remove(self.listener.fileno())
            if self._timer is not None:
                loop.remove(self._timer.fd)
        for p in list(self._pending.values()):
            self._close_pending(p)
        for c in list(self._by_fd.values()):
            self._drop(c)
        self._rx_work.clear()
        self._rsts.clear()
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self.loop = None

    def close(self) -> None:
        self.reset()
        self.listener.close()
        try:
            os.unlink(self.uds_path)
        except FileNotFoundError:
            pass

    # -- host side: accepting and the CONNECT line ---------------------------
    def _on_accept(self, fd: int, events: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                _log.warning("vsock accept failed", error=str(e))
                return
            sock.setblocking(False)
            if len(self._by_fd) + len(self._pending) >= MAX_CONNECTIONS:
                _log.warning("vsock connection limit reached; refusing", limit=MAX_CONNECTIONS)
                sock.close()
                continue
            p = _PendingHostStream(sock)
            self._pending[sock.fileno()] = p
            self.loop.add(sock.fileno(), self._on_pending_readable)
            self._arm_timer()

    def _on_pending_readable(self, fd: int, events: int) -> None:
        p = self._pending.get(fd)
        if p is None:
            return
        try:
            peek = p.sock.recv(CONNECT_LINE_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peek = b""
        nl = peek.find(b"\n")
        if nl < 0:
            if not peek or len(peek) >= CONNECT_LINE_MAX:
                _log.info("vsock host stream closed or sent no CONNECT line")
                self._close_pending(p)
            return
        line = p.sock.recv(nl + 1)  # consume exactly the line; later bytes are payload
        port = _parse_connect(line)
        self.loop.remove(fd)
        del self._pending[fd]
        if port is None:
            _log.info("vsock bad connect command", line=line[:CONNECT_LINE_MAX].decode("latin-1"))
            p.sock.close()
            return
        local = self._allocate_port(port)
        conn = Connection(p.sock, self.guest_cid, local, port, State.LOCAL_INIT)
        self._register(conn)
        self._queue_rx(conn)

    def _close_pending(self, p: _PendingHostStream) -> None:
        fd = p.sock.fileno()
        self._pending.pop(fd, None)
        if self.loop is not None:
            self.loop.remove(fd)
        p.sock.close()

    def _allocate_port(self, peer_port: int) -> int:
        while True:
            self._next_port = ((self._next_port + 1) & ~(1 << 31)) | (1 << 30)
            if (self._next_port, peer_port) not in self.conns:
                return self._next_port

    # -- guest side: TX packets -----------------------------------------------
    def handle_tx(self, pkt: Packet) -> None:
        """A packet the guest sent (already length-checked by parse_tx)."""
        h = pkt.hdr
        if h.src_cid != self.guest_cid:
            _log.info("vsock packet with spoofed source cid dropped", src_cid=h.src_cid)
            return
        if h.op == OP_RST:
            c = self.conns.get((h.dst_port, h.src_port))
            if c is not None:
                c.on_guest_packet(pkt)
                self._drop(c)
            return
        if h.dst_cid != VSOCK_HOST_CID or h.type != TYPE_STREAM or h.op not in KNOWN_OPS:
            self._send_rst(h)
            return
        c = self.conns.get((h.dst_port, h.src_port))
        if c is None:
            if h.op == OP_REQUEST:
                self._guest_connect(h)
            else:
                self._send_rst(h)
            return
        c.on_guest_packet(pkt)
        if c.state is not State.CLOSED:
            c.flush_to_host()
        self._after_update(c)

    def _guest_connect(self, h: Header) -> None:
        if len(self._by_fd) + len(self._pending) >= MAX_CONNECTIONS:
            self._send_rst(h)
            return
        path = f"{self.uds_path}_{h.dst_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            _log.info("vsock guest connect refused", port=h.dst_port, error=errno.errorcode.get(e.errno, str(e)))
            self._send_rst(h)
            return
        conn = Connection(sock, self.guest_cid, h.dst_port, h.src_port, State.ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        conn.ops.append((OP_RESPONSE, 0))
        self._register(conn)
        self._queue_rx(conn)

    def _send_rst(self, h: Header) -> None:
        if len(self._rsts) >= MAX_PENDING_RSTS:
            return  # the guest is flooding us with garbage: it gets no more answers
        self._rsts.append(Header(VSOCK_HOST_CID, h.src_cid, h.dst_port, h.src_port, 0, TYPE_STREAM, OP_RST))
        self._notify_rx()

    # -- RX: packets for the guest ------------------------------------------
    def has_rx(self) -> bool:
        return bool(self._rsts or self._rx_work)

    def next_rx(self, capacity: int) -> Packet | None:
        """The next packet for the guest with at most ``capacity`` payload bytes, or None."""
        if self._rsts:
            return Packet(self._rsts.popleft())
        while self._rx_work:
            c = self._rx_work.popleft()
            c.queued = False
            pkt = c.next_packet(capacity)
            if c.has_rx_work():
                self._queue_rx(c, notify=False)
            self._after_update(c)
            if pkt is not None:
                return pkt
        return None

    def _queue_rx(self, c: Connection, notify: bool = True) -> None:
        if not c.queued:
            c.queued = True
            self._rx_work.append(c)
        if notify:
            self._notify_rx()

    # -- unix stream events ---------------------------------------------------
    def _register(self, c: Connection) -> None:
        self.conns[c.key] = c
        self._by_fd[c.fd] = c
        self._update_interest(c)
        self._arm_timer()

    def _on_stream_event(self, fd: int, events: int) -> None:
        c = self._by_fd.get(fd)
        if c is None:
            return
        if events & select.EPOLLOUT or (events & (select.EPOLLERR | select.EPOLLHUP) and c.to_host):
            c.flush_to_host()
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and c.want_read():
            c.readable = True
        self._after_update(c)

    def _after_update(self, c: Connection) -> None:
        if c.has_rx_work():
            self._queue_rx(c)
        if c.finished and not c.to_host:
            self._drop(c)
        else:
            self._update_interest(c)

    def _update_interest(self, c: Connection) -> None:
        want = (select.EPOLLIN if c.want_read() else 0) | (select.EPOLLOUT if c.to_host else 0)
        have = self._events.get(c.fd, 0)
        if want == have or self.loop is None:
            return
        if not want:
            self.loop.remove(c.fd)  # no interest at all: unregistered, so HUP cannot spin
        elif not have:
            self.loop.add(c.fd, self._on_stream_event, want)
        else:
            self.loop.modify(c.fd, want)
        self._events[c.fd] = want

    def _drop(self, c: Connection) -> None:
        if self._events.pop(c.fd, 0) and self.loop is not None:
            self.loop.remove(c.fd)
        self._by_fd.pop(c.fd, None)
        if self.conns.get(c.key) is c:
            del self.conns[c.key]
        c.sock.close()

    # -- timeouts -----------------------------------------------------------
    def _arm_timer(self) -> None:
        if self._timer is not None and not self._timer.armed:
            self._timer.arm(TICK_S)

    def _on_tick(self, fd: int, events: int) -> None:
        self._timer.consume()
        now = time.monotonic()
        for p in list(self._pending.values()):
            if now >= p.deadline:
                _log.info("vsock host stream sent no CONNECT line in time")
                self._close_pending(p)
        for c in list(self._by_fd.values()):
            if c.expire(now):
                self._after_update(c)
        if not self._pending and not any(c.deadline is not None for c in self._by_fd.values()):
            self._timer.disarm()


def _parse_connect(line: bytes) -> int | None:
    """``CONNECT <port>\\n`` (keyword case-insensitive) -> port, or None."""
    try:
        parts = line.decode("ascii").strip().split()
    except UnicodeDecodeError:
        return None
    if len(parts) != 2 or parts[0].upper() != "CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= 0xFFFFFFFF else None
