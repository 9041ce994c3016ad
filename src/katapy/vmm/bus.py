"""Address buses that route vCPU exits to devices: one for port I/O, one for MMIO.

A device claims ``[base, base + length)`` and is called with the offset from
its base.  Lookups are a bisect over sorted ranges; each device has its own
lock, so two vCPUs touching different devices never wait for each other and
a device never sees two accesses at once (Firecracker's ``Bus`` with a
``Mutex`` per device).  An access nobody claims reads as all-ones (a
floating ISA bus / unassigned MMIO) and writes are dropped.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Protocol

from katapy import log

_log = log.get("vmm.bus")


class BusDevice(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(ValueError):
    pass


@dataclass(order=True)
class _Range:
    base: int
    length: int = field(compare=False)
    device: BusDevice = field(compare=False)
    lock: threading.Lock = field(compare=False, default_factory=threading.Lock)


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._ranges: list[_Range] = []
        self._bases: list[int] = []
        self._mutate = threading.Lock()

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        if length <= 0 or base < 0:
            raise BusError(f"{self.name}: bad range {base:#x}+{length:#x}")
        with self._mutate:
            for r in self._ranges:
                if base < r.base + r.length and r.base < base + length:
                    raise BusError(f"{self.name}: {base:#x}+{length:#x} overlaps {r.base:#x}+{r.length:#x}")
            ranges = sorted(self._ranges + [_Range(base, length, device)])
            # Readers use the two lists without a lock: publish new lists, never mutate old ones.
            self._ranges, self._bases = ranges, [r.base for r in ranges]

    def remove(self, base: int) -> None:
        with self._mutate:
            ranges = [r for r in self._ranges if r.base != base]
            self._ranges, self._bases = ranges, [r.base for r in ranges]

    def _find(self, addr: int, length: int) -> _Range | None:
        ranges, bases = self._ranges, self._bases
        i = bisect.bisect_right(bases, addr) - 1
        if i < 0:
            return None
        r = ranges[i]
        if addr + length <= r.base + r.length:
            return r
        return None

    def read(self, addr: int, length: int) -> bytes:
        r = self._find(addr, length)
        if r is None:
            _log.debug("unclaimed read", bus=self.name, addr=hex(addr), length=length)
            return b"\xff" * length
        with r.lock:
            data = r.device.read(addr - r.base, length)
        return data[:length].ljust(length, b"\0")

    def write(self, addr: int, data: bytes) -> bool:
        """Deliver a write; False when nobody claims the address (the write is dropped)."""
        r = self._find(addr, len(data))
        if r is None:
            _log.debug("unclaimed write", bus=self.name, addr=hex(addr), data=data.hex())
            return False
        with r.lock:
            r.device.write(addr - r.base, data)
        return True
