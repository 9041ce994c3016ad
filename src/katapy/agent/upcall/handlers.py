"""The device-manager service: one upcall request to the module that acts on it, and the reply.

Requests and replies are ``katapy.upcall.wire``'s (dbs-upcall
``dev_mgr_service.rs``; docs/protocols.md §8).  ``ret`` is 0 or a negative
errno; CPU replies also carry the index of the first CPU that failed.  PCI
requests never reach here: the wire decoder refuses them.
"""
from __future__ import annotations

import errno

from katapy.agent.upcall.cpu import CpuHotplug
from katapy.agent.upcall.memory import MemoryHotplug
from katapy.agent.upcall.mmio import MmioHotplug
from katapy.agent.upcall.sysfs import Sysfs
from katapy.upcall.wire import CpuRequest, MemRequest, MmioRequest, MsgType, Reply, Request


class DeviceManager:
    """Serves ADD/DEL of CPUs, memory and virtio-mmio devices against the kernel files under ``sysfs``."""

    def __init__(self, sysfs: Sysfs | None = None, memory: MemoryHotplug | None = None,
                 mmio: MmioHotplug | None = None, cpu: CpuHotplug | None = None) -> None:
        sysfs = sysfs or Sysfs()
        self.memory = memory or MemoryHotplug(sysfs)
        self.mmio = mmio or MmioHotplug(sysfs)
        self.cpu = cpu or CpuHotplug(sysfs)

    def __call__(self, req: Request) -> Reply:
        """The reply to ``req``; a type this service does not serve (or a payload not of its type): -EOPNOTSUPP."""
        t, p = req.type, req.payload
        if t in (MsgType.ADD_CPU, MsgType.DEL_CPU) and isinstance(p, CpuRequest):
            ret, index = (self.cpu.add if t is MsgType.ADD_CPU else self.cpu.remove)(p.apic_ids)
            return Reply(t, ret, index)
        if t in (MsgType.ADD_MEM, MsgType.DEL_MEM) and isinstance(p, MemRequest):
            return Reply(t, (self.memory.add if t is MsgType.ADD_MEM else self.memory.remove)(p.base, p.size))
        if t in (MsgType.ADD_MMIO, MsgType.DEL_MMIO) and isinstance(p, MmioRequest):
            return Reply(t, (self.mmio.add if t is MsgType.ADD_MMIO else self.mmio.remove)(p.base, p.size, p.irq))
        return Reply(t, -errno.EOPNOTSUPP)
