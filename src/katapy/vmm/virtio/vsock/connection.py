"""One vsock stream between a guest port and a host unix socket (virtio 1.2, 5.10.6.3-5.10.6.6).

The connection owns its unix stream and speaks virtio-vsock to the guest
through packets the muxer carries.  Flow control works both ways:

* guest -> host: we advertise ``buf_alloc`` and ``fwd_cnt`` (bytes written to
  the unix stream).  Bytes the unix peer has not yet taken wait in ``to_host``,
  which the guest's credit bounds; a guest sending past it is reset.
* host -> guest: we read from the unix stream only what the guest's last
  advertised credit allows (``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``), so a
  guest that stops reading stalls only its own connection: its unix socket
  stays unread (the kernel's socket buffer pushes back on the host writer).
"""
from __future__ import annotations

import enum
import socket
import time
from collections import deque

from katapy import log
from katapy.vmm.virtio.vsock.packet import (
    MAX_PKT_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, VSOCK_HOST_CID, Header, Packet,
)

_log = log.get("vmm.virtio.vsock")

#: Our receive buffer per connection, advertised as buf_alloc.
CONN_BUF_SIZE = 256 * 1024
#: Send a CREDIT_UPDATE when the guest believes less than this is free.
CREDIT_UPDATE_THRESHOLD = CONN_BUF_SIZE // 4
#: How long we wait for the guest's RESPONSE to our REQUEST once the REQUEST is in the guest's RX
#: queue (Firecracker's CONN_REQUEST_TIMEOUT, likewise counted from delivery), or its RST after our
#: full SHUTDOWN.
PEER_TIMEOUT_S = 2.0
#: How long a host-initiated connection may wait for an RX buffer to carry its REQUEST (a guest that
#: posts none, or is behind with a long backlog) before it is given up.
REQUEST_DELIVERY_TIMEOUT_S = 10.0
U32 = 0xFFFFFFFF


class State(enum.Enum):
    LOCAL_INIT = "local-init"  # host connected, we sent REQUEST, waiting for RESPONSE
    ESTABLISHED = "established"
    CLOSING = "closing"  # we sent SHUTDOWN(both); waiting for the guest's RST
    CLOSED = "closed"


class Connection:
    def __init__(self, sock: socket.socket, guest_cid: int, local_port: int, peer_port: int, state: State):
        self.sock = sock
        self.fd = sock.fileno()
        self.guest_cid = guest_cid
        self.local_port = local_port  # host side port
        self.peer_port = peer_port  # guest side port
        self.state = state
        # LOCAL_INIT: first the REQUEST must reach the guest's RX queue; PEER_TIMEOUT_S starts from there
        self.deadline: float | None = (time.monotonic() + REQUEST_DELIVERY_TIMEOUT_S
                                       if state is State.LOCAL_INIT else None)
        # guest -> host
        self.to_host = bytearray()
        self.handshake_left = 0  # leading bytes of to_host that are the "OK <port>\n" line, not payload
        self.rx_cnt = 0  # payload bytes received from the guest
        self.fwd_cnt = 0  # of those, bytes written to the unix stream
        self.last_fwd_cnt_sent = 0
        # host -> guest
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.credit_requested = False
        self.readable = False  # the unix stream signalled EPOLLIN and we have not drained it
        self.host_eof = False
        self.peer_shutdown = 0
        self.sent_shutdown = 0
        self.queued = False  # in the muxer's RX work queue
        self.ops: deque[tuple[int, int]] = deque()  # (op, flags) control packets owed to the guest
        if state is State.LOCAL_INIT:
            self.ops.append((OP_REQUEST, 0))

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    # -- credit -------------------------------------------------------------
    def peer_free(self) -> int:
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, min(self.peer_buf_alloc - in_flight, CONN_BUF_SIZE * 64))

    def _our_free(self) -> int:
        return CONN_BUF_SIZE - ((self.rx_cnt - self.fwd_cnt) & U32)

    def _maybe_credit_update(self) -> None:
        believed_free = CONN_BUF_SIZE - ((self.rx_cnt - self.last_fwd_cnt_sent) & U32)
        if believed_free < CREDIT_UPDATE_THRESHOLD and self.fwd_cnt != self.last_fwd_cnt_sent:
            self._owe(OP_CREDIT_UPDATE)

    def _owe(self, op: int, flags: int = 0) -> None:
        if op in (OP_CREDIT_UPDATE, OP_CREDIT_REQUEST) and any(o == op for o, _ in self.ops):
            return
        self.ops.append((op, flags))

    # -- from the guest -----------------------------------------------------
    def on_guest_packet(self, pkt: Packet) -> None:
        """Apply one packet the guest sent on this connection (fields already range-checked)."""
        h = pkt.hdr
        self.peer_buf_alloc = h.buf_alloc
        self.peer_fwd_cnt = h.fwd_cnt
        if h.op == OP_RST:
            self.state = State.CLOSED
            self.ops.clear()
            return
        if self.state is State.LOCAL_INIT:
            if h.op == OP_RESPONSE:
                self.state = State.ESTABLISHED
                self.deadline = None
                line = f"OK {self.local_port}\n".encode()
                self.to_host[:0] = line
                self.handshake_left = len(line)
            else:
                self.reset("unexpected packet before RESPONSE", op=h.op)
            return
        if h.op == OP_RW:
            if self.peer_shutdown & SHUTDOWN_SEND:
                self.reset("data after the guest shut down sending")
            elif len(pkt.payload) > self._our_free():
                self.reset("guest sent past its credit", len=len(pkt.payload), free=self._our_free())
            else:
                self.to_host += pkt.payload
                self.rx_cnt = (self.rx_cnt + len(pkt.payload)) & U32
        elif h.op == OP_CREDIT_REQUEST:
            self._owe(OP_CREDIT_UPDATE)
        elif h.op == OP_CREDIT_UPDATE:
            self.credit_requested = False
        elif h.op == OP_SHUTDOWN:
            self.peer_shutdown |= h.flags & SHUTDOWN_BOTH
            if self.peer_shutdown & SHUTDOWN_RCV:
                self.readable = False
        else:  # REQUEST or RESPONSE on an established connection
            self.reset("unexpected op on an established connection", op=h.op)
        if self.peer_free() > 0:
            self.credit_requested = False
        self._settle()

    def _settle(self) -> None:
        """Act on shutdown state once ``to_host`` is flushed."""
        if self.state is not State.ESTABLISHED and self.state is not State.CLOSING or self.to_host:
            return
        if self.peer_shutdown & SHUTDOWN_SEND:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if self.peer_shutdown == SHUTDOWN_BOTH:
            self._owe(OP_RST)
            self.state = State.CLOSED

    def reset(self, why: str, **kw: object) -> None:
        _log.info("vsock connection reset", reason=why, local_port=self.local_port, peer_port=self.peer_port, **kw)
        self.ops.clear()
        self.ops.append((OP_RST, 0))
        self.to_host.clear()
        self.state = State.CLOSED

    # -- towards the unix stream --------------------------------------------
    def flush_to_host(self) -> None:
        while self.to_host:
            try:
                n = self.sock.send(self.to_host[:MAX_PKT_PAYLOAD * 4])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.reset("unix stream write failed", error=str(e))
                return
            del self.to_host[:n]
            skip = min(n, self.handshake_left)
            self.handshake_left -= skip
            self.fwd_cnt = (self.fwd_cnt + n - skip) & U32
        if self.state is State.ESTABLISHED:
            self._maybe_credit_update()
        self._settle()

    # -- towards the guest --------------------------------------------------
    def _header(self, op: int, flags: int = 0, length: int = 0) -> Header:
        self.last_fwd_cnt_sent = self.fwd_cnt
        return Header(VSOCK_HOST_CID, self.guest_cid, self.local_port, self.peer_port, length, TYPE_STREAM, op,
                      flags, CONN_BUF_SIZE, self.fwd_cnt)

    def has_rx_work(self) -> bool:
        return bool(self.ops) or (self.readable and self.state is State.ESTABLISHED)

    def next_packet(self, capacity: int) -> Packet | None:
        """The next packet for the guest, with at most ``capacity`` payload bytes."""
        if self.ops:
            op, flags = self.ops.popleft()
            if op == OP_SHUTDOWN:
                self.sent_shutdown |= flags
            elif op == OP_REQUEST and self.state is State.LOCAL_INIT:
                self.deadline = time.monotonic() + PEER_TIMEOUT_S  # the guest has it now
            return Packet(self._header(op, flags))
        if not self.readable or self.state is not State.ESTABLISHED:
            return None
        want = min(capacity, self.peer_free(), MAX_PKT_PAYLOAD)
        if want <= 0:
            self.readable = False  # re-armed when the guest's credit grows
            if not self.credit_requested:
                self.credit_requested = True
                return Packet(self._header(OP_CREDIT_REQUEST))
            return None
        try:
            data = self.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            self.readable = False
            return None
        except OSError as e:
            self.reset("unix stream read failed", error=str(e))
            return self.next_packet(capacity)
        if not data:
            self.readable = False
            self.host_eof = True
            return self._on_host_eof()
        self.tx_cnt = (self.tx_cnt + len(data)) & U32
        return Packet(self._header(OP_RW, 0, len(data)), data)

    def _on_host_eof(self) -> Packet:
        if self.peer_shutdown & SHUTDOWN_SEND:
            # both directions are finished: a full shutdown; the guest answers with RST
            self.state = State.CLOSING
            self.deadline = time.monotonic() + PEER_TIMEOUT_S
            flags = SHUTDOWN_BOTH
        else:
            flags = SHUTDOWN_SEND  # half close: the guest may still send to the host
        self.sent_shutdown |= flags
        return Packet(self._header(OP_SHUTDOWN, flags))

    def want_read(self) -> bool:
        return (self.state is State.ESTABLISHED and not self.readable and not self.host_eof
                and not self.peer_shutdown & SHUTDOWN_RCV and self.peer_free() > 0)

    def expire(self, now: float) -> bool:
        """Past the handshake/close deadline: the connection is reset.  Returns True if it expired.

        A REQUEST that never reached the guest is dropped without an RST (the guest knows no such
        connection), so the host stream is closed at once even while the guest posts no RX buffers."""
        if self.deadline is None or now < self.deadline or self.state is State.CLOSED:
            return False
        if self.state is State.LOCAL_INIT and (OP_REQUEST, 0) in self.ops:
            _log.info("vsock connection given up: no RX buffer for its REQUEST", local_port=self.local_port,
                      peer_port=self.peer_port)
            self.ops.clear()
            self.to_host.clear()
            self.state = State.CLOSED
            return True
        self.reset("peer timeout", state=self.state.value)
        return True

    @property
    def finished(self) -> bool:
        """Closed, with nothing left to tell the guest."""
        return self.state is State.CLOSED and not self.ops
