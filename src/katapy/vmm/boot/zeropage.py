"""struct boot_params, the "zero page" (Documentation/arch/x86/zero-page.rst and boot.rst).

A bzImage's own setup header is copied in first (boot.rst: "the boot loader
should ... load the setup header from the kernel image"), then the fields a
boot loader must fill are written: type_of_loader, the command line pointer
and size, the initrd address and size, and the e820 memory map.  For an ELF
vmlinux there is no header in the image, so a minimal one is made
(boot_flag, HdrS, kernel_alignment), as Firecracker does.
"""
from __future__ import annotations

import struct

from katapy.vmm.boot import setup_header as sh
from katapy.vmm.boot.e820 import E820_MAX_ENTRIES_ZEROPAGE, E820Entry

ZERO_PAGE_SIZE = 4096
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_E820_TABLE = 0x2D0
E820_ENTRY_SIZE = 20
DEFAULT_KERNEL_ALIGNMENT = 0x0100_0000


def build(
    cmdline_addr: int,
    cmdline_size: int,
    e820: list[E820Entry],
    initrd: tuple[int, int] | None = None,
    header: sh.SetupHeader | None = None,
) -> bytes:
    """The 4 KiB zero page."""
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(e820)} e820 entries; the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")
    page = bytearray(ZERO_PAGE_SIZE)
    if header is not None:
        page[sh.SETUP_HEADER_START : sh.SETUP_HEADER_START + len(header.raw)] = header.raw
    else:
        struct.pack_into("<H", page, sh.OFF_BOOT_FLAG, sh.BOOT_FLAG)
        struct.pack_into("<I", page, sh.OFF_HEADER, sh.HDRS_MAGIC)
        struct.pack_into("<I", page, sh.OFF_KERNEL_ALIGNMENT, DEFAULT_KERNEL_ALIGNMENT)
    page[sh.OFF_TYPE_OF_LOADER] = sh.LOADER_TYPE_UNDEFINED
    page[sh.OFF_LOADFLAGS] |= sh.LOADFLAG_LOADED_HIGH
    struct.pack_into("<I", page, sh.OFF_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, OFF_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", page, sh.OFF_CMDLINE_SIZE, cmdline_size)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<I", page, sh.OFF_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
        struct.pack_into("<I", page, sh.OFF_RAMDISK_SIZE, size & 0xFFFFFFFF)
        struct.pack_into("<I", page, OFF_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", page, OFF_EXT_RAMDISK_SIZE, size >> 32)
    page[OFF_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        struct.pack_into("<QQI", page, OFF_E820_TABLE + i * E820_ENTRY_SIZE, e.addr, e.size, e.type)
    return bytes(page)
