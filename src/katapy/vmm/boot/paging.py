"""Identity-mapped boot page tables for long mode (Intel SDM vol. 3A, 4.5 "4-Level Paging").

The 64-bit boot protocol needs the kernel, the zero page and the command
line identity-mapped; the kernel builds its own tables right after.  One
PML4 entry -> one PDPT -> four page directories of 2 MiB pages cover the
first 4 GiB (Firecracker maps 1 GiB; 4 GiB also covers an initrd high in low RAM).
"""
from __future__ import annotations

import struct

from katapy.vmm.boot import layout
from katapy.vmm.memory import GuestMemory

PRESENT = 1 << 0
WRITABLE = 1 << 1
PAGE_SIZE_2M = 1 << 7


def build_page_tables() -> dict[int, bytes]:
    """Page-table pages keyed by guest address."""
    pml4 = struct.pack("<Q", layout.PDPTE_START | PRESENT | WRITABLE).ljust(4096, b"\0")
    pdpt_entries = [
        (layout.PDE_START + i * 4096) | PRESENT | WRITABLE for i in range(layout.IDENTITY_MAPPED_GIB)
    ]
    pdpt = struct.pack(f"<{len(pdpt_entries)}Q", *pdpt_entries).ljust(4096, b"\0")
    pages = {layout.PML4_START: pml4, layout.PDPTE_START: pdpt}
    for gib in range(layout.IDENTITY_MAPPED_GIB):
        pde = [((gib << 30) + (i << 21)) | PRESENT | WRITABLE | PAGE_SIZE_2M for i in range(512)]
        pages[layout.PDE_START + gib * 4096] = struct.pack("<512Q", *pde)
    return pages


def write_page_tables(mem: GuestMemory) -> int:
    """Write the tables into guest RAM; returns the CR3 value."""
    for addr, page in build_page_tables().items():
        mem.write(addr, page)
    return layout.PML4_START
