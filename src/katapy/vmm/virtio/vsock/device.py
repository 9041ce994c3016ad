"""The virtio-vsock device (virtio 1.2, section 5.10): rx/tx/event queues, config ``le64 guest_cid``.

The device moves packets between the queues and its :class:`VsockMuxer`; it
knows nothing about unix sockets.  Queue 0 (rx) carries host->guest packets,
queue 1 (tx) guest->host, queue 2 (event) transport resets; over vhost-user
QEMU keeps the event queue itself and hands us only rx and tx.
"""
from __future__ import annotations

import os
import struct

from katapy import log
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory, GuestMemoryError
from katapy.vmm.virtio.device import (
    VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_VSOCK, DeviceError, Interrupt,
    QueueState, VirtioDevice,
)
from katapy.vmm.virtio.queue import Queue
from katapy.vmm.virtio.vsock.muxer import VsockMuxer
from katapy.vmm.virtio.vsock.packet import HDR_SIZE, PacketError, parse_tx, rx_capacity

_log = log.get("vmm.virtio.vsock")

RXQ, TXQ, EVQ = 0, 1, 2
QUEUE_SIZE = 1024  # QEMU's vhost-user-vsock uses 1024-entry rings


class VsockDevice(VirtioDevice):
    device_type = VIRTIO_ID_VSOCK
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, guest_cid: int, uds_path: str | os.PathLike[str]):
        super().__init__()
        if not 3 <= guest_cid < 0xFFFFFFFF:
            raise ValueError(f"guest cid {guest_cid} is reserved or out of range")
        self.guest_cid = guest_cid
        self.muxer = VsockMuxer(os.fspath(uds_path))
        self._queues: list[Queue] = []
        self._kick_fds: list[int] = []
        self._interrupt: Interrupt | None = None
        self._loop: EventLoop | None = None
        self._in_tx = False
        self._in_rx = False
        self._rx_wanted = False

    def avail_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    # -- life cycle -----------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: list[QueueState], kick_fds: list[int], interrupt: Interrupt,
                 loop: EventLoop) -> None:
        if len(queues) < 2:
            raise DeviceError("virtio-vsock needs at least the rx and tx queues")
        event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
        for q in queues:
            q.event_idx = event_idx
        self._queues = [Queue(mem, q) for q in queues]
        self._kick_fds = list(kick_fds)
        self._interrupt, self._loop = interrupt, loop
        self.broken = False
        for i, fd in enumerate(self._kick_fds):
            loop.add(fd, lambda fd, ev, i=i: self._on_kick(i, fd))
        self.muxer.activate(loop, self.guest_cid, self._process_rx)
        _log.info("vsock device activated", guest_cid=self.guest_cid, uds=self.muxer.uds_path, queues=len(queues))
        self._process_tx()
        self._process_rx()

    def reset(self) -> None:
        if self._loop is not None:
            for fd in self._kick_fds:
                self._loop.remove(fd)
            self.muxer.reset()
        self._queues, self._kick_fds, self._interrupt, self._loop = [], [], None, None

    def close(self) -> None:
        self.reset()
        self.muxer.close()

    # -- queue processing -------------------------------------------------------
    def _on_kick(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        if self.broken:
            return
        if index == TXQ:
            self._process_tx()
        elif index == RXQ:
            self._process_rx()
        # event queue: the driver only refills buffers; we send no events

    def _fail(self, why: str) -> None:
        _log.error("vsock device broken by the driver", reason=why)
        self.broken = True
        if self._loop is not None:
            for fd in self._kick_fds:
                self._loop.remove(fd)
        if self._interrupt is not None:
            self._interrupt.signal_needs_reset(why)

    def _process_tx(self) -> None:
        if not self._queues or self.broken:
            return
        q = self._queues[TXQ]
        self._in_tx = True
        try:
            while (chain := q.pop_valid(_log)) is not None:
                try:
                    pkt = parse_tx(chain)
                except (PacketError, GuestMemoryError, EOFError) as e:
                    _log.warning("vsock: malformed tx packet dropped", error=str(e))
                else:
                    self.muxer.handle_tx(pkt)
                q.add_used(chain.head, 0)
        except (DeviceError, GuestMemoryError) as e:
            self._fail(str(e))
            return
        finally:
            self._in_tx = False
        if q.needs_notification():
            self._interrupt.signal_used_queue(TXQ)
        if self._rx_wanted:
            self._process_rx()

    def _process_rx(self) -> None:
        if not self._queues or self.broken:
            return
        if self._in_tx or self._in_rx:
            # called back from the muxer while a batch is running: the running batch picks the
            # work up; re-entering would complete chains out of order (reordering stream data)
            self._rx_wanted = True
            return
        self._rx_wanted = False
        self._in_rx = True
        try:
            self._rx_batch()
        finally:
            self._in_rx = False

    def _rx_batch(self) -> None:
        q = self._queues[RXQ]
        try:
            while self.muxer.has_rx() and (chain := q.pop_valid(_log)) is not None:
                cap = rx_capacity(chain)
                if cap < 0:
                    _log.warning("vsock: rx buffer cannot hold a header", head=chain.head)
                    q.add_used(chain.head, 0)
                    continue
                pkt = self.muxer.next_rx(cap)
                if pkt is None:
                    q.undo_pop()  # nothing to send after all; the buffer stays the driver's
                    break
                pkt.hdr.len = len(pkt.payload)
                w = chain.writer()
                w.write_all(pkt.hdr.pack())
                if pkt.payload:
                    w.write_all(pkt.payload)
                q.add_used(chain.head, HDR_SIZE + len(pkt.payload))
        except (DeviceError, GuestMemoryError, EOFError) as e:
            self._fail(str(e))
            return
        if q.needs_notification():
            self._interrupt.signal_used_queue(RXQ)
