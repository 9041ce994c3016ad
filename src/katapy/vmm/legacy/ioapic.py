"""The I/O APIC of a split irqchip: its registers in the VMM, its interrupts delivered by KVM as MSIs.

With ``KVM_CAP_SPLIT_IRQCHIP`` (api.rst 7.8) KVM keeps the local APICs and the
VMM keeps the I/O APIC.  This is the register interface of the Intel 82093AA
(datasheet 290566, section 3): an index register IOREGSEL at offset 0x00 and a
data window IOWIN at 0x10, 32-bit accesses, behind which sit IOAPICID (0x00),
IOAPICVER (0x01), IOAPICARB (0x02) and the 24 redirection-table entries
(0x10 + 2n low dword, 0x11 + 2n high dword).  The version register reads 0x11
with 23 as the highest entry, as KVM's in-kernel I/O APIC does.

Delivery: the devices signal their pins through irqfds on GSI = pin.  Whenever
the guest writes an entry, the entry becomes a KVM MSI route for that GSI
(Intel SDM vol. 3, 11.11 "Message signalled interrupts": address 0xFEE00000 |
destination << 12 | destination mode << 2; data = vector | delivery mode << 8),
or no route while the entry is masked, and the whole table is handed to
``on_routes``.  KVM then injects straight into the target LAPIC from the
irqfd's wake-up, with no VMM thread in the path.  katapy's devices raise
edges (an eventfd write), never hold a line, so every pin is routed as an
edge: a pin the guest sets level-triggered is delivered the same way, its
Remote IRR stays 0 and no EOI exit (KVM_EXIT_IOAPIC_EOI) is asked for.  An
edge on a masked pin is dropped, as on the 82093AA.

Everything the guest writes is taken as it comes: an access that is not a
32-bit load or store of IOREGSEL or IOWIN, and an index that names no
register, read as 0 and are ignored on write; read-only bits keep their
value.  No guest input reaches KVM other than as a well-formed MSI route.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from katapy import log
from katapy.vmm.boot import layout
from katapy.vmm.boot.mptable import IOAPIC_PINS, IOAPIC_VERSION
from katapy.vmm.kvm.vm import MsiRoute

IOAPIC_BASE = layout.IOAPIC_ADDR
IOAPIC_SIZE = 0x1000

IOREGSEL, IOWIN = 0x00, 0x10
REG_ID, REG_VER, REG_ARB, REG_TABLE = 0x00, 0x01, 0x02, 0x10

ENTRY_MASKED = 1 << 16
# writable bits of an entry: vector, delivery mode, destination mode, polarity, trigger mode, mask, destination;
# delivery status (12) and Remote IRR (14) are read-only
ENTRY_WRITABLE = 0xFF00_0000_0001_AFFF
MSI_ADDRESS_BASE = 0xFEE0_0000

_log = log.get("vmm.ioapic")


@dataclass(frozen=True)
class RedirectionEntry:
    """One 64-bit redirection-table entry, decoded (82093AA 3.2.4)."""

    raw: int

    @property
    def vector(self) -> int:
        return self.raw & 0xFF

    @property
    def delivery_mode(self) -> int:  # 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT
        return (self.raw >> 8) & 0x7

    @property
    def logical(self) -> bool:
        return bool(self.raw >> 11 & 1)

    @property
    def masked(self) -> bool:
        return bool(self.raw & ENTRY_MASKED)

    @property
    def destination(self) -> int:
        return (self.raw >> 56) & 0xFF

    def msi(self, gsi: int) -> MsiRoute:
        """The MSI that delivers this entry's interrupt (always edge: see the module docstring)."""
        address = MSI_ADDRESS_BASE | self.destination << 12 | int(self.logical) << 2
        return MsiRoute(gsi, address, self.vector | self.delivery_mode << 8)


class Ioapic:
    """The 82093AA registers on the MMIO bus; ``on_routes`` receives the MSI routes of all unmasked pins."""

    def __init__(self, on_routes: Callable[[list[MsiRoute]], None], ioapic_id: int = 0) -> None:
        self._on_routes = on_routes
        self.id = ioapic_id & 0xF
        self.select = 0
        self.entries = [ENTRY_MASKED] * IOAPIC_PINS  # all masked at reset (3.2.4)
        self.routes: list[MsiRoute] = []

    # --- bus device ---------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if length != 4:
            return bytes(length)
        if offset == IOREGSEL:
            value = self.select
        elif offset == IOWIN:
            value = self._read_register(self.select)
        else:
            value = 0
        return struct.pack("<I", value)

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 4:
            return
        (value,) = struct.unpack("<I", data)
        if offset == IOREGSEL:
            self.select = value & 0xFF
        elif offset == IOWIN:
            self._write_register(self.select, value)

    # --- registers ----------------------------------------------------------------------
    def _read_register(self, index: int) -> int:
        if index == REG_ID:
            return self.id << 24
        if index == REG_VER:
            return (IOAPIC_PINS - 1) << 16 | IOAPIC_VERSION
        if index == REG_ARB:
            return self.id << 24
        pin, high = self._entry_index(index)
        if pin is None:
            return 0
        entry = self.entries[pin]
        return (entry >> 32) & 0xFFFF_FFFF if high else entry & 0xFFFF_FFFF

    def _write_register(self, index: int, value: int) -> None:
        if index == REG_ID:
            self.id = (value >> 24) & 0xF
            return
        pin, high = self._entry_index(index)
        if pin is None:
            return
        old = self.entries[pin]
        new = (old & 0xFFFF_FFFF) | value << 32 if high else (old & ~0xFFFF_FFFF) | value
        new = (old & ~ENTRY_WRITABLE) | (new & ENTRY_WRITABLE)
        if new != old:
            self.entries[pin] = new
            self._update_routes()

    @staticmethod
    def _entry_index(index: int) -> tuple[int | None, bool]:
        if REG_TABLE <= index < REG_TABLE + 2 * IOAPIC_PINS:
            return (index - REG_TABLE) // 2, bool((index - REG_TABLE) & 1)
        return None, False

    def _update_routes(self) -> None:
        entries = [(pin, RedirectionEntry(raw)) for pin, raw in enumerate(self.entries)]
        routes = [entry.msi(pin) for pin, entry in entries if not entry.masked]
        if routes != self.routes:
            self.routes = routes
            self._on_routes(routes)
            _log.debug("ioapic routes", pins=[r.gsi for r in routes])
