"""Address buses that route vCPU exits to devices: one for port I/O, one for MMIO.

A device claims ``[base, base + length)`` and is called with the offset from
its base.  Lookups are a bisect over sorted ranges; each device has its own
lock, so two vCPUs touching different devices never wait for each other and
a device never sees two accesses at once (Firecracker's ``Bus`` with a
``Mutex`` per device).  An access nobody claims reads as all-ones (a
floating ISA bus / unassigned MMIO) and writes are dropped.

Changes while vCPU threads run (device hotplug swaps a placeholder for a
virtio-mmio transport and back): readers take no bus lock, so every change
publishes a new ``(ranges, bases)`` tuple in one attribute store, never
mutating a published list.  :meth:`Bus.replace` and :meth:`Bus.remove` then
*retire* the old range under its device lock: an access already inside the
old device finishes first, and one that looked the range up before the swap
but locks it after sees ``retired`` and looks the address up again.  So when
they return, no vCPU is in or will enter the old device, and it may be closed.
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
    retired: bool = field(compare=False, default=False)  # set under ``lock`` once it left the table


class Bus:
    def __init__(self, name: str):
        self.name = name
        # (ranges sorted by base, their bases): replaced whole, never mutated (see the module docstring)
        self._table: tuple[list[_Range], list[int]] = ([], [])
        self._mutate = threading.Lock()

    def _publish(self, ranges: list[_Range]) -> None:
        ranges = sorted(ranges)
        self._table = (ranges, [r.base for r in ranges])

    @staticmethod
    def _retire(r: _Range) -> None:
        with r.lock:  # waits for an access in progress; later ones see ``retired`` and look up again
            r.retired = True

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        if length <= 0 or base < 0:
            raise BusError(f"{self.name}: bad range {base:#x}+{length:#x}")
        with self._mutate:
            ranges = self._table[0]
            for r in ranges:
                if base < r.base + r.length and r.base < base + length:
                    raise BusError(f"{self.name}: {base:#x}+{length:#x} overlaps {r.base:#x}+{r.length:#x}")
            self._publish(ranges + [_Range(base, length, device)])

    def remove(self, base: int) -> None:
        """Drop the device at ``base`` (nothing there: no-op); on return no vCPU is inside it."""
        with self._mutate:
            ranges = self._table[0]
            gone = [r for r in ranges if r.base == base]
            self._publish([r for r in ranges if r.base != base])
            for r in gone:
                self._retire(r)

    def replace(self, base: int, device: BusDevice) -> BusDevice:
        """Put ``device`` in place of the one at ``base`` (same range) and return the old one.

        Safe while vCPUs run: an access sees the old device or the new one, never neither; on return
        no access is inside the old device, nor will one enter it.
        """
        with self._mutate:
            ranges = self._table[0]
            old = next((r for r in ranges if r.base == base), None)
            if old is None:
                raise BusError(f"{self.name}: no device at {base:#x} to replace")
            self._publish([r for r in ranges if r is not old] + [_Range(base, old.length, device)])
            self._retire(old)
            return old.device

    def device_at(self, base: int) -> BusDevice | None:
        """The device whose range starts at ``base``."""
        ranges, bases = self._table
        i = bisect.bisect_left(bases, base)
        return ranges[i].device if i < len(bases) and bases[i] == base else None

    def _find(self, addr: int, length: int) -> _Range | None:
        ranges, bases = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i < 0:
            return None
        r = ranges[i]
        if addr + length <= r.base + r.length:
            return r
        return None

    def read(self, addr: int, length: int) -> bytes:
        while True:
            r = self._find(addr, length)
            if r is None:
                _log.debug("unclaimed read", bus=self.name, addr=hex(addr), length=length)
                return b"\xff" * length
            with r.lock:
                if r.retired:  # swapped out after the lookup: look again
                    continue
                data = r.device.read(addr - r.base, length)
            return data[:length].ljust(length, b"\0")

    def write(self, addr: int, data: bytes) -> bool:
        """Deliver a write; False when nobody claims the address (the write is dropped)."""
        while True:
            r = self._find(addr, len(data))
            if r is None:
                _log.debug("unclaimed write", bus=self.name, addr=hex(addr), data=data.hex())
                return False
            with r.lock:
                if r.retired:
                    continue
                r.device.write(addr - r.base, data)
            return True
