"""The boot GDT and the segment registers built from it (Intel SDM vol. 3A, 3.4.5 "Segment Descriptors").

The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit
Boot Protocol") wants flat 4 GiB segments at selector __BOOT_CS = 0x10
(execute/read) and __BOOT_DS = 0x18 (read/write).  PVH (xen/arch-x86/
hvm/start_info.h) enters in 32-bit protected mode with flat segments.  Both
get a TSS descriptor so TR is loadable (VM entry rejects an unusable TR).
"""
from __future__ import annotations

import struct

from katapy.vmm.kvm.vcpu import Segment

# Descriptor "flags" word in Firecracker's notation: bits 0-7 access byte, bits 12-15 the G/D/L/AVL nibble.
CODE64_FLAGS = 0xA09B  # G=1 L=1 P=1 S=1 type=0xb (exec/read, accessed)
CODE32_FLAGS = 0xC09B  # G=1 D=1 P=1 S=1 type=0xb
DATA_FLAGS = 0xC093  # G=1 D/B=1 P=1 S=1 type=0x3 (read/write, accessed)
TSS_FLAGS = 0x808B  # G=1 P=1 S=0 type=0xb (busy 32/64-bit TSS)

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Pack one 8-byte segment descriptor."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


def segment_from_entry(entry: int, selector: int) -> Segment:
    """The hidden part of a segment register loaded from descriptor ``entry`` (what KVM_SET_SREGS wants)."""
    base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    seg = Segment(
        base=base,
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector,
        type=(entry >> 40) & 0xF,
        s=(entry >> 44) & 1,
        dpl=(entry >> 45) & 3,
        present=(entry >> 47) & 1,
        avl=(entry >> 52) & 1,
        l=(entry >> 53) & 1,
        db=(entry >> 54) & 1,
        g=g,
    )
    seg.unusable = 0 if seg.present else 1
    return seg


def boot_gdt(long_mode: bool = True) -> list[int]:
    """NULL, NULL, code (0x10), data (0x18), TSS (0x20)."""
    return [
        0,
        0,
        gdt_entry(CODE64_FLAGS if long_mode else CODE32_FLAGS, 0, 0xFFFFF),
        gdt_entry(DATA_FLAGS, 0, 0xFFFFF),
        gdt_entry(TSS_FLAGS, 0, 0xFFFFF),
    ]


def pack_gdt(entries: list[int]) -> bytes:
    return struct.pack(f"<{len(entries)}Q", *entries)
