"""The virtio-net device (virtio 1.2, section 5.1) over a host tap.

One receive/transmit queue pair (receiveq1 = 0, transmitq1 = 1; no control
queue, no multiqueue).  Features offered: VERSION_1, EVENT_IDX, MAC (the MAC
is in config space) and STATUS (link always up).  No checksum or
segmentation offload and no MRG_RXBUF: the driver posts receive buffers that
each hold a whole frame (Linux's "small buffers", 5.1.6.3.1) and sends whole,
checksummed frames.  A legacy driver (no VERSION_1) gets the 10-byte header.

Both directions run on the device's event-loop thread:

* transmit (5.1.6.2): on a kick each chain is read (header + frame), checked
  (length, header fields) and written to the tap with a zeroed header; a
  chain the tap cannot take (EAGAIN, link down) is dropped and counted, as a
  NIC drops on a full wire;
* receive (5.1.6.3/4): when the tap is readable a frame is read and copied
  into the next receive chain with num_buffers = 1.  With no receive buffer
  posted, the tap fd is left unwatched until the driver kicks the receive
  queue, so frames wait in the tap's own queue rather than being dropped.

Every guest-supplied chain is checked by katapy.vmm.virtio.queue; a chain
too short for a header, or for the frame at hand, is completed with length 0.
"""
from __future__ import annotations

import os
import select

from katapy import log
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory, GuestMemoryError
from katapy.vmm.virtio.device import (
    VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_ID_NET, DeviceError, Interrupt, QueueState, VirtioDevice,
)
from katapy.vmm.virtio.net.header import (
    ETH_HEADER_LEN, HEADER_SIZE, LEGACY_HEADER_SIZE, MAX_FRAME_LEN, NetHeader, check_tx_header,
)
from katapy.vmm.virtio.net.tap import TapError
from katapy.vmm.virtio.net.tap import Tap
from katapy.vmm.virtio.queue import DescriptorChain, Queue

_log = log.get("vmm.virtio.net")

# Feature bits, 5.1.3.
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
# config status bits, 5.1.4
VIRTIO_NET_S_LINK_UP = 1

RX_QUEUE, TX_QUEUE = 0, 1
QUEUE_SIZE = 1024  # QEMU's virtio-mmio front end lets the driver pick up to 1024 (vhost-user)
#: frames moved per event before yielding the loop to other devices
BATCH = 64


def parse_mac(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"invalid MAC address {mac!r}: want six hex octets separated by ':'")
    raw = bytes(int(p, 16) for p in parts)
    if raw[0] & 1:
        raise ValueError(f"MAC address {mac} is a multicast address")
    return raw


class NetDevice(VirtioDevice):
    device_type = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, tap_name: str, mac: str, tap_fd: int | None = None):
        """``tap_fd``: an fd already attached to ``tap_name`` (owned by the device from now on);
        without it the tap is opened by name in the current network namespace."""
        super().__init__()
        self.mac = parse_mac(mac)
        self.tap = Tap.adopt(tap_fd) if tap_fd is not None else Tap.open(tap_name)
        self._rx: Queue | None = None
        self._tx: Queue | None = None
        self._kicks: list[int] = []
        self._interrupt: Interrupt | None = None
        self._loop: EventLoop | None = None
        self._tap_watched = False
        self._pending: bytes | None = None  # a frame read from the tap, waiting for a receive buffer
        self._hdr = HEADER_SIZE  # 10 for a driver without VERSION_1 (legacy)
        self.stats = {"rx_frames": 0, "rx_bytes": 0, "rx_dropped": 0,
                      "tx_frames": 0, "tx_bytes": 0, "tx_dropped": 0, "bad_chains": 0}

    # -- features and config ------------------------------------------------------
    def avail_features(self) -> int:
        return (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX
                | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS)

    def config_space(self) -> bytes:
        """struct virtio_net_config (5.1.4): mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu."""
        return (self.mac + VIRTIO_NET_S_LINK_UP.to_bytes(2, "little") + (1).to_bytes(2, "little")
                + (0).to_bytes(2, "little"))

    # -- life cycle ------------------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: list[QueueState], kick_fds: list[int], interrupt: Interrupt,
                 loop: EventLoop) -> None:
        if len(queues) < 2 or len(kick_fds) < 2:
            raise DeviceError("virtio-net needs its receive and transmit queues")
        if self.tap.fd < 0:
            raise DeviceError("virtio-net: the tap was closed")
        self._hdr = HEADER_SIZE if self.has_feature(VIRTIO_F_VERSION_1) else LEGACY_HEADER_SIZE
        try:
            self.tap.set_header_size(self._hdr)
        except TapError as e:
            raise DeviceError(str(e)) from None
        event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
        for q in queues[:2]:
            q.event_idx = event_idx
        self._rx, self._tx = Queue(mem, queues[RX_QUEUE]), Queue(mem, queues[TX_QUEUE])
        self._kicks, self._interrupt, self._loop = list(kick_fds[:2]), interrupt, loop
        self.broken = False
        loop.add(self._kicks[RX_QUEUE], self._on_rx_kick)
        loop.add(self._kicks[TX_QUEUE], self._on_tx_kick)
        loop.add(self.tap.fd, self._on_tap)
        self._tap_watched = True
        _log.info("virtio-net activated", tap=self.tap.name, mac=self.mac.hex(":"),
                  features=hex(self.acked_features), header_bytes=self._hdr)
        # Serve what is already queued from the loop thread: activate() may run on another
        # thread (a vCPU writing DRIVER_OK) while the loop already watches the tap.
        loop.call_soon(self._transmit)
        loop.call_soon(self._receive)

    def reset(self) -> None:
        if self._loop is not None:
            for fd in (*self._kicks, self.tap.fd):
                if fd >= 0:
                    self._loop.remove(fd)
        self._rx = self._tx = None
        self._kicks, self._interrupt, self._loop = [], None, None
        self._tap_watched = False
        self._pending = None

    def close(self) -> None:
        self.reset()
        self.tap.close()

    # -- events ---------------------------------------------------------------------------
    @staticmethod
    def _drain(fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass

    def _on_rx_kick(self, fd: int, events: int) -> None:
        self._drain(fd)
        self._receive()

    def _on_tx_kick(self, fd: int, events: int) -> None:
        self._drain(fd)
        self._transmit()

    def _on_tap(self, fd: int, events: int) -> None:
        self._receive()

    def _watch_tap(self, on: bool) -> None:
        if self._loop is not None and on != self._tap_watched:
            self._loop.modify(self.tap.fd, select.EPOLLIN if on else 0)
            self._tap_watched = on

    def _broken(self, direction: str, error: Exception) -> None:
        _log.error("virtio-net queue broken by the driver", queue=direction, error=str(error))
        self.broken = True
        if self._loop is not None:
            for fd in (*self._kicks, self.tap.fd):
                self._loop.remove(fd)
        if self._interrupt is not None:
            self._interrupt.signal_needs_reset(str(error))

    # -- transmit (5.1.6.2) -----------------------------------------------------------------
    def _transmit(self) -> None:
        q = self._tx
        if self.broken or q is None or self._interrupt is None:
            return
        try:
            for _ in range(BATCH):
                chain = q.pop_valid(_log)
                if chain is None:
                    break
                self._send(chain)
                q.add_used(chain.head, 0)
            else:
                assert self._loop is not None
                self._loop.call_soon(self._transmit)  # more to do: let other fds run first
        except (DeviceError, GuestMemoryError) as e:
            self._broken("transmit", e)
            return
        if q.needs_notification():
            self._interrupt.signal_used_queue(TX_QUEUE)

    def _send(self, chain: DescriptorChain) -> None:
        total, hdr = chain.readable_len, self._hdr
        if total < hdr + ETH_HEADER_LEN or total > hdr + MAX_FRAME_LEN:
            self._drop("tx", f"transmit chain of {total} bytes (want a header and a frame of "
                             f"{ETH_HEADER_LEN}..{MAX_FRAME_LEN} bytes)", bad=True)
            return
        data = chain.reader().read_exact(total)
        problem = check_tx_header(NetHeader.unpack(data[:hdr]))
        if problem:
            self._drop("tx", problem, bad=True)
            return
        try:
            self.tap.write_frame(bytes(hdr) + data[hdr:])
        except OSError as e:
            self._drop("tx", f"tap write: {e.strerror}")
            return
        self.stats["tx_frames"] += 1
        self.stats["tx_bytes"] += total - hdr

    def _drop(self, direction: str, reason: str, bad: bool = False) -> None:
        self.stats[f"{direction}_dropped"] += 1
        if bad:
            self.stats["bad_chains"] += 1
            _log.warning("virtio-net frame dropped", direction=direction, reason=reason)
        else:
            _log.debug("virtio-net frame dropped", direction=direction, reason=reason)

    # -- receive (5.1.6.3, 5.1.6.4) --------------------------------------------------------------
    def _receive(self) -> None:
        q = self._rx
        if self.broken or q is None or self._interrupt is None:
            return
        try:
            for _ in range(BATCH):
                frame = self._pending if self._pending is not None else self.tap.read_frame(self._hdr + MAX_FRAME_LEN)
                self._pending = None
                if frame is None:
                    self._watch_tap(True)
                    break
                chain = q.pop_valid(_log)
                if chain is None:
                    # No buffer posted: keep the frame, stop watching the tap until the driver kicks.
                    self._pending = frame
                    self._watch_tap(False)
                    break
                q.add_used(chain.head, self._deliver(chain, frame))
            else:
                assert self._loop is not None
                self._loop.call_soon(self._receive)
        except (DeviceError, GuestMemoryError) as e:
            self._broken("receive", e)
            return
        if q.needs_notification():
            self._interrupt.signal_used_queue(RX_QUEUE)

    def _deliver(self, chain: DescriptorChain, frame: bytes) -> int:
        """Copy one tap frame into a receive chain; the used length (0 when it does not fit)."""
        hdr = self._hdr
        if len(frame) < hdr + ETH_HEADER_LEN:
            self._drop("rx", f"tap gave {len(frame)} bytes, shorter than a header and an Ethernet header")
            return 0
        if chain.readable:
            self._drop("rx", "receive chain has device-readable buffers", bad=True)
            return 0
        if chain.writable_len < len(frame):
            self._drop("rx", f"receive chain of {chain.writable_len} bytes for a {len(frame)}-byte frame", bad=True)
            return 0
        # Offloads are off on the tap, so frames arrive complete; without GUEST_CSUM the flags must
        # be zero, and without MRG_RXBUF num_buffers is 1 (5.1.6.4.1).
        writer = chain.writer()
        writer.write_all(NetHeader(num_buffers=1).pack()[:hdr])
        writer.write_all(memoryview(frame)[hdr:])
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += len(frame) - hdr
        return len(frame)
