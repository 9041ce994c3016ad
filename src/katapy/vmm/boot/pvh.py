"""PVH boot: struct hvm_start_info and its memory map (xen/include/public/arch-x86/hvm/start_info.h).

The kernel's PVH entry (arch/x86/platform/pvh/head.S) finds the command
line, the initrd (module 0) and the memory map through this structure,
whose address is in %ebx.  Firecracker's arch/x86_64/mod.rs configure_pvh
uses the same placement: start info at 0x6000, the module list at 0x6040,
the memory map at 0x7000.
"""
from __future__ import annotations

import struct

from katapy.vmm.boot import layout
from katapy.vmm.boot.e820 import E820Entry

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
START_INFO_VERSION = 1  # has memmap_paddr / memmap_entries
START_INFO_SIZE = 56
MODLIST_ENTRY_SIZE = 32
MEMMAP_ENTRY_SIZE = 24
MAX_MEMMAP_ENTRIES = (layout.MPTABLE_START - layout.PVH_MEMMAP_START) // MEMMAP_ENTRY_SIZE


def start_info(cmdline_addr: int, memmap_entries: int, initrd: tuple[int, int] | None) -> bytes:
    """struct hvm_start_info (56 bytes)."""
    return struct.pack(
        "<IIIIQQQQII",
        XEN_HVM_START_MAGIC_VALUE,
        START_INFO_VERSION,
        0,  # flags
        1 if initrd else 0,  # nr_modules
        layout.PVH_MODLIST_START if initrd else 0,
        cmdline_addr,
        0,  # rsdp_paddr: no ACPI
        layout.PVH_MEMMAP_START,
        memmap_entries,
        0,
    )


def modlist_entry(addr: int, size: int) -> bytes:
    """struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved."""
    return struct.pack("<QQQQ", addr, size, 0, 0)


def memmap(entries: list[E820Entry]) -> bytes:
    """hvm_memmap_table_entry[]: addr, size, type (e820 types), reserved."""
    if len(entries) > MAX_MEMMAP_ENTRIES:
        raise ValueError(f"{len(entries)} memory map entries do not fit")
    return b"".join(struct.pack("<QQII", e.addr, e.size, e.type, 0) for e in entries)
