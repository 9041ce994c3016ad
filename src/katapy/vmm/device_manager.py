"""Places virtio-mmio devices in the guest: address window, IRQ, ioeventfds, irqfd, command line.

Firecracker's device_manager/mmio.rs layout: windows of 0x1000 bytes from
0xd0000000 upwards, IRQs from 5 upwards (IOAPIC pins, edge-triggered through
an irqfd).  Each queue's QueueNotify is a KVM ioeventfd on base + 0x50 with
datamatch = queue index (api.rst 4.59), so a kick never leaves the kernel.
The guest learns about each device from ``virtio_mmio.device=4K@0x<base>:<irq>``
(drivers/virtio/virtio_mmio.c, CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
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
from katapy.vmm.virtio.device import VirtioDevice
from katapy.vmm.virtio.mmio import QUEUE_NOTIFY, MmioTransport

_log = log.get("vmm.devices")


class DeviceManagerError(RuntimeError):
    pass


@dataclass
class MmioSlot:
    base: int
    irq: int
    transport: MmioTransport
    irq_fd: int
    kick_fds: list[int]

    @property
    def cmdline(self) -> str:
        return f"virtio_mmio.device=4K@{self.base:#x}:{self.irq}"


class MmioDeviceManager:
    def __init__(self, vm: VmFd | None, mem: GuestMemory, bus: Bus, loop: EventLoop):
        self.vm = vm
        self.mem = mem
        self.bus = bus
        self.loop = loop
        self.slots: list[MmioSlot] = []
        self._next_base = layout.MMIO_MEM_START
        self._next_irq = layout.VIRTIO_IRQ_BASE

    def add(self, device: VirtioDevice) -> MmioSlot:
        if self._next_irq > layout.VIRTIO_IRQ_MAX:
            raise DeviceManagerError("out of IOAPIC pins for virtio-mmio devices")
        base, irq = self._next_base, self._next_irq
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
            self.bus.insert(transport, base, layout.MMIO_DEVICE_LEN)
        except BaseException:
            self._unregister(base, irq, irq_fd, kick_fds, registered)
            raise
        slot = MmioSlot(base, irq, transport, irq_fd, kick_fds)
        self.slots.append(slot)
        self._next_base += layout.MMIO_DEVICE_LEN
        self._next_irq += 1
        _log.info("virtio-mmio device placed", device_type=device.device_type, base=hex(base), irq=irq)
        return slot

    def cmdline_fragments(self) -> list[str]:
        return [s.cmdline for s in self.slots]

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
        for s in self.slots:
            s.transport.close()
            self.bus.remove(s.base)
            self._unregister(s.base, s.irq, s.irq_fd, s.kick_fds, list(range(len(s.kick_fds))))
        self.slots = []
