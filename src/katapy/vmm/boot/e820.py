"""The guest's memory map: BIOS e820 entries (ACPI spec 6.5 section 15, "System Address Map Interfaces";
Linux Documentation/arch/x86/zero-page.rst, e820_table).

Used both for the zero page (Linux boot protocol) and, in the same shape, for
PVH's hvm_memmap_table.
"""
from __future__ import annotations

from dataclasses import dataclass

from katapy.vmm.boot import layout

E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES_ZEROPAGE = 128


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


def memory_map(mem_size: int) -> list[E820Entry]:
    """RAM below the EBDA, the EBDA/MP table reserved, RAM from 1 MiB to the MMIO hole, RAM above 4 GiB."""
    entries = [
        E820Entry(0, layout.EBDA_START, E820_RAM),
        E820Entry(layout.EBDA_START, 0xA0000 - layout.EBDA_START, E820_RESERVED),
    ]
    low_end = layout.low_ram_end(mem_size)
    if low_end > layout.HIMEM_START:
        entries.append(E820Entry(layout.HIMEM_START, low_end - layout.HIMEM_START, E820_RAM))
    if mem_size > layout.MMIO_MEM_START:
        entries.append(
            E820Entry(layout.FIRST_ADDR_PAST_32BITS, mem_size - layout.MMIO_MEM_START, E820_RAM)
        )
    return entries
