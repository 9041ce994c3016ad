"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2 "Virtio Over MMIO").

One :class:`MmioTransport` puts one :class:`~katapy.vmm.virtio.device.VirtioDevice`
behind the register file of section 4.2.2.  It enforces the device status
state machine (2.1, 3.1.1): bits are only ever added, in the order
ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK; driver features are
accepted only between DRIVER and FEATURES_OK, queue registers only between
FEATURES_OK and DRIVER_OK; FEATURES_OK sticks only if VIRTIO_F_VERSION_1 was
accepted and nothing outside the offer was (3.1.1 step 5-6).  On DRIVER_OK
the queues are checked against guest memory and the device is activated;
a failure sets DEVICE_NEEDS_RESET and sends a configuration-change
interrupt (2.1.2).  Writing 0 to Status resets everything (2.4).

Every guest value is checked: registers are 32-bit aligned words (4.2.2.2),
unknown offsets read 0 and writes to them are dropped, QueueNum must be a
power of two no larger than QueueNumMax (2.7, split virtqueues).

Notifications: QueueNotify at base + 0x50 is normally absorbed by a KVM
ioeventfd with datamatch = queue index, so the device's kick fd fires with
no exit; a write that does reach us (no ioeventfd) signals the same fd.
Interrupts: set a bit in InterruptStatus, then fire ``irq`` (an irqfd write).

Threads: registers are written on vCPU threads; the device's activation and
reset are handed to the device event loop's thread, the only one that runs
its queue processing.
"""
from __future__ import annotations

import os
import struct
import threading
from typing import Callable

from katapy import log
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory
from katapy.vmm.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, Interrupt, QueueState, VirtioDevice

_log = log.get("vmm.virtio.mmio")

MMIO_MAGIC_VALUE = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR_ID = 0x4B415450  # "KATP"

# Register offsets (4.2.2)
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100
MMIO_WINDOW = 0x1000

# Device status bits (2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# InterruptStatus bits (4.2.2)
INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

def queue_part_sizes(size: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """((desc bytes, align), (avail bytes, align), (used bytes, align)) of a split virtqueue of
    ``size`` entries (2.7, table "Virtqueue Part Sizes" and "Virtqueue Part Alignment").

    The table's sizes are whole: the 6 bytes of the driver area are flags, idx and used_event,
    those of the device area flags, idx and avail_event (2.7.6, 2.7.8), whether or not
    VIRTIO_F_EVENT_IDX was negotiated; nothing is added for it.
    """
    return (16 * size, 16), (6 + 2 * size, 2), (6 + 8 * size, 4)


class MmioInterrupt(Interrupt):
    """InterruptStatus bits plus an edge on the device's IRQ line."""

    def __init__(self, transport: "MmioTransport"):
        self._t = transport

    def signal_used_queue(self, queue_index: int) -> None:
        self._t.raise_interrupt(INT_USED_BUFFER)

    def signal_config_change(self) -> None:
        self._t.config_generation += 1
        self._t.raise_interrupt(INT_CONFIG_CHANGE)

    def signal_needs_reset(self, reason: str) -> None:
        self._t.needs_reset(reason)


class MmioTransport:
    """Bus device for one virtio-mmio window (0x1000 bytes)."""

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        loop: EventLoop,
        irq: Callable[[], None],
        kick_fds: list[int] | None = None,
    ):
        self.device = device
        self.mem = mem
        self.loop = loop
        self._irq = irq
        self.queues = [QueueState(max_size=m) for m in device.queue_max_sizes]
        # One kick eventfd per queue; the device manager also registers each as a KVM ioeventfd.
        self._own_kick_fds = kick_fds is None
        self.kick_fds = kick_fds if kick_fds is not None else [
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in self.queues
        ]
        self._int_lock = threading.Lock()
        self.interrupt_status = 0
        self.config_generation = 0
        self.notify_exits = 0
        self.interrupt = MmioInterrupt(self)
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.activated = False
        with self._int_lock:
            self.interrupt_status = 0
        for q in self.queues:
            q.reset()

    # -- interrupts -------------------------------------------------------------
    def raise_interrupt(self, bits: int) -> None:
        with self._int_lock:
            self.interrupt_status |= bits
        self._irq()

    # -- bus device -------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if offset >= CONFIG:
            if length not in (1, 2, 4, 8):
                return bytes(length)
            return self.device.read_config(offset - CONFIG, length)
        if length != 4 or offset % 4:
            return bytes(length)
        return struct.pack("<I", self._read_register(offset) & 0xFFFFFFFF)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG:
            if len(data) in (1, 2, 4, 8) and offset - CONFIG + len(data) <= MMIO_WINDOW - CONFIG:
                self.device.write_config(offset - CONFIG, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            _log.debug("unaligned virtio-mmio register write dropped", offset=hex(offset), length=len(data))
            return
        self._write_register(offset, struct.unpack("<I", data)[0])

    # -- registers ----------------------------------------------------------------
    def _queue(self) -> QueueState | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        q = self._queue()
        if offset == MAGIC_VALUE:
            return MMIO_MAGIC_VALUE
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_type
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self.device.avail_features() >> (32 * self.device_features_sel)
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == INTERRUPT_STATUS:
            with self._int_lock:
                return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions (4.2.2: length -1 means none)
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0

    def _queue_config_allowed(self) -> bool:
        s = self.status
        return bool(s & FEATURES_OK) and not s & (DRIVER_OK | FAILED | DEVICE_NEEDS_RESET)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & DRIVER and not self.status & FEATURES_OK and self.driver_features_sel <= 1:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            else:
                _log.debug("DriverFeatures write outside DRIVER..FEATURES_OK ignored", status=self.status)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            self.notify_exits += 1  # only when no ioeventfd took it
            if value < len(self.kick_fds):
                os.eventfd_write(self.kick_fds[value], 1)
        elif offset == INTERRUPT_ACK:
            with self._int_lock:
                self.interrupt_status &= ~value
        elif offset == STATUS:
            self._set_status(value)
        elif offset in (QUEUE_NUM, QUEUE_READY, QUEUE_RESET) or QUEUE_DESC_LOW <= offset <= QUEUE_DEVICE_HIGH:
            self._write_queue_register(offset, value)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._queue()
        if q is None or not self._queue_config_allowed():
            _log.debug("queue register write ignored", offset=hex(offset), status=self.status, queue=self.queue_sel)
            return
        if offset == QUEUE_READY:
            if value == 1:
                if q.size == 0:
                    _log.warning("QueueReady with no valid QueueNum refused", queue=self.queue_sel)
                    return
                q.ready = True
            else:
                q.ready = False
            return
        if q.ready:
            return  # a live queue's layout cannot change (4.2.3.2)
        if offset == QUEUE_NUM:
            if value == 0 or value > q.max_size or value & (value - 1):
                _log.warning("QueueNum refused", queue=self.queue_sel, num=value, max=q.max_size)
                return
            q.size = value
        elif offset == QUEUE_DESC_LOW:
            q.desc_table = (q.desc_table & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DESC_HIGH:
            q.desc_table = (q.desc_table & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DRIVER_LOW:
            q.avail_ring = (q.avail_ring & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DRIVER_HIGH:
            q.avail_ring = (q.avail_ring & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DEVICE_LOW:
            q.used_ring = (q.used_ring & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DEVICE_HIGH:
            q.used_ring = (q.used_ring & 0xFFFFFFFF) | (value << 32)

    # -- status state machine -------------------------------------------------
    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        if value & FAILED:
            self.status |= FAILED
            return
        if value & old != old or value & ~(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK):
            _log.warning("status write clears or sets unknown bits; ignored", old=old, new=value)
            return
        added = value & ~old
        order = (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK)
        for bit in order:
            if added & bit:
                prerequisites = order[: order.index(bit)]
                if any(not value & p for p in prerequisites):
                    _log.warning("status bit out of order; ignored", old=old, new=value)
                    return
        if old & DEVICE_NEEDS_RESET:
            return  # only a reset gets the device going again
        if added & FEATURES_OK and not self._accept_features():
            value &= ~FEATURES_OK
            if value & DRIVER_OK:
                return
        self.status = value
        if added & DRIVER_OK:
            self._activate()

    def _accept_features(self) -> bool:
        offered = self.device.avail_features()
        if self.driver_features & ~offered:
            _log.warning("driver accepted features never offered", extra=hex(self.driver_features & ~offered))
            return False
        if not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
            _log.warning("driver did not accept VIRTIO_F_VERSION_1; a version-2 device needs it")
            return False
        self.device.ack_features(self.driver_features)
        return True

    def _queues_valid(self) -> str | None:
        event_idx = bool(self.driver_features >> VIRTIO_F_EVENT_IDX & 1)
        for i, q in enumerate(self.queues):
            if not q.ready:
                continue
            parts = zip(("descriptor table", "driver area", "device area"),
                        (q.desc_table, q.avail_ring, q.used_ring),
                        queue_part_sizes(q.size))
            for name, addr, (size, align) in parts:
                if addr % align:
                    return f"queue {i} {name} at {addr:#x} is not {align}-byte aligned"
                if not self.mem.check_range(addr, size):
                    return f"queue {i} {name} {addr:#x}+{size:#x} is outside guest RAM"
            q.event_idx = event_idx
        return None

    def _activate(self) -> None:
        problem = self._queues_valid()
        if problem is None:
            try:
                # On the device loop's thread, where the device's kick callbacks run: activation
                # processes the queues at once, and doing that on this vCPU thread beside a kick
                # callback let two threads pop and complete the same chains (the guest then freed
                # buffers the device went on writing into).
                self.loop.run_sync(
                    lambda: self.device.activate(self.mem, self.queues, self.kick_fds, self.interrupt, self.loop))
                self.activated = True
                _log.info("virtio device activated", device_type=self.device.device_type)
                return
            except Exception as exc:  # the device refused: tell the driver, never crash the vCPU
                problem = f"activation failed: {exc!r}"
        self.needs_reset(problem)

    def needs_reset(self, reason: str) -> None:
        """The device cannot go on (2.1.2): set DEVICE_NEEDS_RESET and, once the driver has set
        DRIVER_OK, send a configuration-change notification (4.2.2 InterruptStatus bit 1)."""
        _log.warning("virtio device needs reset", device_type=self.device.device_type, reason=reason)
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self.interrupt.signal_config_change()

    def reset(self) -> None:
        """Status = 0 (2.4): stop the device, forget all negotiated state."""
        if self.activated:
            try:
                self.loop.run_sync(self.device.reset)  # not beside a running kick callback (see _activate)
            except Exception as exc:
                _log.error("device reset failed", error=repr(exc))
        for fd in self.kick_fds:  # drop stale notifications
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        self._reset_registers()

    def close(self) -> None:
        """The VMM is going away."""
        try:
            self.device.close()
        except Exception as exc:
            _log.error("device close failed", error=repr(exc))
        if self._own_kick_fds:
            for fd in self.kick_fds:
                os.close(fd)
            self.kick_fds = []
