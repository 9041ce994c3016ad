"""Places virtio-mmio devices in the guest: address window, IRQ, ioeventfds, irqfd, command line.

Firecracker's device_manager/mmio.rs layout: windows of 0x1000 bytes from
0xd0000000 upwards, IRQs from 5 upwards (IOAPIC pins, edge-triggered through
an irqfd).  Each queue's QueueNotify is a KVM ioeventfd on base + 0x50 with
datamatch = queue index (api.rst 4.59), so a kick never leaves the kernel.
The guest learns about each device from ``virtio_mmio.device=4K@0x<base>:<irq>``
(drivers/virtio/virtio_mmio.c, CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).

Hotplug slots (:meth:`MmioDeviceManager.reserve_hotplug`): windows placed
after the cold devices, each with its own pin, listed on the command line
too but holding a :class:`~katapy.vmm.virtio.placeholder.PlaceholderSlot`
(DeviceID 0, so the guest's probe declines it).  :meth:`populate` puts a
device's transport in a free slot's window (irqfd and ioeventfds first, then
the bus swap); :meth:`depopulate` swaps the placeholder back, closes the
transport and its device on the device loop's thread (no queue callback of
it runs beside the close) and releases the eventfds.  Telling the guest
(ADD_MMIO / DEL_MMIO) is katapy.vmm.device_hotplug's part.

Each placed device gets a name for its counters (:meth:`queue_counts`):
``virtio-<type>-<n>``, ``n`` counting that type's devices in the order they
were placed, cold then hot-plugged, never reused in one VM: a name always
means one device, so its counters never go back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from katapy import log
from katapy.vmm.boot import layout
from katapy.vmm.bus import Bus
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.kvm.vm import VmFd
from katapy.vmm.memory import GuestMemory
from katapy.vmm.state import QueueCounts
from katapy.vmm.virtio.device import (
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_CONSOLE,
    VIRTIO_ID_FS,
    VIRTIO_ID_NET,
    VIRTIO_ID_VSOCK,
    VirtioDevice,
)
from katapy.vmm.virtio.mmio import QUEUE_NOTIFY, MmioTransport
from katapy.vmm.virtio.placeholder import PlaceholderSlot

_log = log.get("vmm.devices")

#: the ``<type>`` of a device's counter name (``virtio-blk-0``), by virtio device ID
TYPE_NAMES = {VIRTIO_ID_NET: "net", VIRTIO_ID_BLOCK: "blk", VIRTIO_ID_CONSOLE: "console",
              VIRTIO_ID_VSOCK: "vsock", VIRTIO_ID_FS: "fs"}


class DeviceManagerError(RuntimeError):
    pass


@dataclass
class MmioSlot:
    base: int
    irq: int
    transport: MmioTransport
    irq_fd: int
    kick_fds: list[int]
    name: str = ""  # virtio-<type>-<n>, the device's label in its counters

    @property
    def cmdline(self) -> str:
        return f"virtio_mmio.device=4K@{self.base:#x}:{self.irq}"


@dataclass
class HotplugSlot:
    """A virtio-mmio window reserved at build time for a device added later; ``plugged`` while populated."""

    base: int
    irq: int
    plugged: MmioSlot | None = None

    @property
    def cmdline(self) -> str:
        return f"virtio_mmio.device=4K@{self.base:#x}:{self.irq}"


#: IOAPIC pins the virtio-mmio windows may use (cold devices and hotplug slots together)
VIRTIO_PINS = layout.VIRTIO_IRQ_MAX - layout.VIRTIO_IRQ_BASE + 1


class MmioDeviceManager:
    def __init__(self, vm: VmFd | None, mem: GuestMemory, bus: Bus, loop: EventLoop):
        self.vm = vm
        self.mem = mem
        self.bus = bus
        self.loop = loop
        self.slots: list[MmioSlot] = []
        self.hotplug: list[HotplugSlot] = []
        self._next_base = layout.MMIO_MEM_START
        self._next_irq = layout.VIRTIO_IRQ_BASE
        self._placed_of_type: dict[int, int] = {}  # device type -> devices of it placed so far (names)

    def _next_window(self, what: str) -> tuple[int, int]:
        """The next window's (base, irq), or a clear error when no IOAPIC pin is left."""
        if self._next_irq > layout.VIRTIO_IRQ_MAX:
            raise DeviceManagerError(
                f"out of IOAPIC pins for {what}: pins {layout.VIRTIO_IRQ_BASE}..{layout.VIRTIO_IRQ_MAX} "
                f"({VIRTIO_PINS}) are all taken by {len(self.slots)} device(s) and {len(self.hotplug)} hotplug slot(s)")
        return self._next_base, self._next_irq

    def _advance(self) -> None:
        self._next_base += layout.MMIO_DEVICE_LEN
        self._next_irq += 1

    def add(self, device: VirtioDevice) -> MmioSlot:
        """Cold-plug ``device`` in the next window (before the guest boots)."""
        base, irq = self._next_window("virtio-mmio devices")
        slot = self._place(device, base, irq, lambda t: self.bus.insert(t, base, layout.MMIO_DEVICE_LEN))
        self.slots.append(slot)
        self._advance()
        _log.info("virtio-mmio device placed", device_type=device.device_type, base=hex(base), irq=irq)
        return slot

    def reserve_hotplug(self, count: int) -> list[HotplugSlot]:
        """Reserve ``count`` empty windows (placeholders on the bus) after the devices placed so far."""
        if count > layout.VIRTIO_IRQ_MAX + 1 - self._next_irq:
            raise DeviceManagerError(
                f"{count} hotplug slots do not fit: IOAPIC pins {self._next_irq}..{layout.VIRTIO_IRQ_MAX} are "
                f"left ({layout.VIRTIO_IRQ_MAX + 1 - self._next_irq}) after {len(self.slots)} device(s)")
        new = []
        for _ in range(count):
            base, irq = self._next_window("hotplug slots")
            self.bus.insert(PlaceholderSlot(), base, layout.MMIO_DEVICE_LEN)
            self._advance()
            slot = HotplugSlot(base, irq)
            self.hotplug.append(slot)
            new.append(slot)
        if new:
            _log.info("virtio-mmio hotplug slots reserved", count=count, first=hex(new[0].base), irqs=[s.irq for s in new])
        return new

    def free_hotplug_slot(self) -> HotplugSlot | None:
        return next((h for h in self.hotplug if h.plugged is None), None)

    def populate(self, device: VirtioDevice) -> MmioSlot:
        """Put ``device`` in the first free hotplug slot (its transport replaces the placeholder)."""
        h = self.free_hotplug_slot()
        if h is None:
            raise DeviceManagerError(f"no free virtio-mmio hotplug slot (all {len(self.hotplug)} are in use)"
                                     if self.hotplug else "this VM has no virtio-mmio hotplug slots")
        slot = self._place(device, h.base, h.irq, lambda t: self.bus.replace(h.base, t))
        h.plugged = slot
        _log.info("virtio-mmio slot populated", device_type=device.device_type, base=hex(h.base), irq=h.irq)
        return slot

    def depopulate(self, base: int) -> None:
        """Empty the hotplug slot at ``base``: placeholder back, transport and device closed, eventfds released."""
        h = next((h for h in self.hotplug if h.base == base), None)
        if h is None or h.plugged is None:
            raise DeviceManagerError(f"no hot-plugged virtio-mmio device at {base:#x}")
        slot = h.plugged
        self.bus.replace(base, PlaceholderSlot())  # from here no vCPU reaches the transport
        h.plugged = None
        try:
            # on the loop's thread: none of the device's kick or back-end callbacks runs beside the close
            self.loop.run_sync(slot.transport.close)
        except Exception as exc:
            _log.error("closing a hot-unplugged device failed", base=hex(base), error=repr(exc))
        finally:
            self._unregister(slot.base, slot.irq, slot.irq_fd, slot.kick_fds, list(range(len(slot.kick_fds))))
        _log.info("virtio-mmio slot emptied", device_type=slot.transport.device.device_type, base=hex(base))

    def plugged(self) -> list[MmioSlot]:
        """The slots holding a device now: the cold ones, then the populated hotplug slots."""
        return [*self.slots, *(h.plugged for h in self.hotplug if h.plugged is not None)]

    def find(self, device: VirtioDevice) -> MmioSlot | None:
        """The slot (cold or hot-plugged) whose transport serves ``device``."""
        for s in self.plugged():
            if s.transport.device is device:
                return s
        return None

    def _place(self, device: VirtioDevice, base: int, irq: int, attach) -> MmioSlot:  # attach(transport)
        irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        kick_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in device.queue_max_sizes]
        registered: list[int] = []
        try:
            if self.vm is not None:
                self.vm.register_irqfd(irq_fd, irq)
                for i, fd in enumerate(kick_fds):
                    self.vm.register_ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=i)
                    registered.append(i)
            transport = MmioTransport(
                device, self.mem, self.loop, lambda fd=irq_fd: os.eventfd_write(fd, 1), kick_fds
            )
            attach(transport)
        except BaseException:
            self._unregister(base, irq, irq_fd, kick_fds, registered)
            raise
        n = self._placed_of_type.get(device.device_type, 0)
        self._placed_of_type[device.device_type] = n + 1
        kind = TYPE_NAMES.get(device.device_type, str(device.device_type))
        return MmioSlot(base, irq, transport, irq_fd, kick_fds, f"virtio-{kind}-{n}")

    def queue_counts(self) -> list[QueueCounts]:
        """The counters of every queue of every device plugged now (any thread: plain reads)."""
        return [QueueCounts(s.name, i, q.requests, q.read_bytes, q.written_bytes)
                for s in self.plugged() for i, q in enumerate(s.transport.queues)]

    def cmdline_fragments(self) -> list[str]:
        """One ``virtio_mmio.device=`` per window, cold devices and hotplug slots, in address order
        (the guest names them ``virtio-mmio.<N>`` in this order)."""
        windows: list[MmioSlot | HotplugSlot] = [*self.slots, *self.hotplug]
        return [w.cmdline for w in sorted(windows, key=lambda w: w.base)]

    def _unregister(self, base: int, irq: int, irq_fd: int, kick_fds: list[int], queues: list[int]) -> None:
        if self.vm is not None and self.vm.fd >= 0:
            for i in queues:
                try:
                    self.vm.unregister_ioeventfd(kick_fds[i], base + QUEUE_NOTIFY, 4, datamatch=i)
                except OSError:
                    pass
            try:
                self.vm.unregister_irqfd(irq_fd, irq)
            except OSError:
                pass
        for fd in kick_fds + [irq_fd]:
            os.close(fd)

    def close(self) -> None:
        plugged = [h.plugged for h in self.hotplug if h.plugged is not None]
        for s in [*self.slots, *plugged]:
            s.transport.close()
            self.bus.remove(s.base)
            self._unregister(s.base, s.irq, s.irq_fd, s.kick_fds, list(range(len(s.kick_fds))))
        for h in self.hotplug:
            self.bus.remove(h.base)
        self.slots = []
        self.hotplug = []
