"""Initial vCPU state for the two boot protocols katapy supports.

* Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit Boot
  Protocol"): long mode with paging, CS=__BOOT_CS, DS/ES/SS=__BOOT_DS,
  interrupts off, %rsi = address of struct boot_params.
* PVH (xen/include/public/arch-x86/hvm/start_info.h, "x86/HVM direct boot
  ABI"): 32-bit protected mode, paging off, flat CS/DS, %ebx = address of
  struct hvm_start_info.

Also the FPU (x87 FCW 0x37f, MXCSR 0x1f80, their reset values) and the LAPIC
LINT pins (LINT0 = ExtINT for the PIC, LINT1 = NMI, as the MP spec's
virtual-wire mode expects; Firecracker's interrupts.rs set_lint).
"""
from __future__ import annotations

import struct

from katapy.vmm.boot import gdt, layout
from katapy.vmm.kvm.vcpu import DTable, Fpu, Regs, Sregs

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def linux64_regs(entry: int, boot_params: int = layout.ZERO_PAGE_START) -> Regs:
    return Regs(
        rip=entry,
        rsp=layout.BOOT_STACK_POINTER,
        rbp=layout.BOOT_STACK_POINTER,
        rsi=boot_params,
        rflags=0x2,
    )


def pvh_regs(entry: int, start_info: int = layout.PVH_INFO_START) -> Regs:
    return Regs(rip=entry, rbx=start_info, rflags=0x2)


def boot_sregs(current: Sregs, long_mode: bool, cr3: int = layout.PML4_START) -> Sregs:
    """``current`` (from KVM_GET_SREGS) with the boot segments, GDT/IDT and control registers set."""
    entries = gdt.boot_gdt(long_mode)
    code = gdt.segment_from_entry(entries[gdt.BOOT_CS // 8], gdt.BOOT_CS)
    data = gdt.segment_from_entry(entries[gdt.BOOT_DS // 8], gdt.BOOT_DS)
    tss = gdt.segment_from_entry(entries[gdt.BOOT_TSS // 8], gdt.BOOT_TSS)
    s = current
    s.gdt = DTable(base=layout.BOOT_GDT_START, limit=len(entries) * 8 - 1)
    s.idt = DTable(base=layout.BOOT_IDT_START, limit=7)
    s.cs = code
    s.ds = s.es = s.fs = s.gs = s.ss = data
    s.tr = tss
    if long_mode:
        s.cr3 = cr3
        s.cr4 |= X86_CR4_PAE
        s.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET
        s.efer |= EFER_LME | EFER_LMA
    else:
        s.cr0 = (s.cr0 | X86_CR0_PE | X86_CR0_ET) & ~X86_CR0_PG
        s.cr4 = 0
        s.efer &= ~(EFER_LME | EFER_LMA)
    return s


def boot_gdt_and_idt(long_mode: bool) -> dict[int, bytes]:
    """The GDT and an empty IDT, keyed by guest address."""
    return {
        layout.BOOT_GDT_START: gdt.pack_gdt(gdt.boot_gdt(long_mode)),
        layout.BOOT_IDT_START: bytes(8),
    }


def boot_fpu() -> Fpu:
    return Fpu(fcw=0x37F, mxcsr=0x1F80)


def with_lint_pins(lapic: bytes) -> bytes:
    """LAPIC register page with LINT0 in ExtINT and LINT1 in NMI delivery mode."""
    regs = bytearray(lapic)
    for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", regs, off)
        struct.pack_into("<I", regs, off, (value & ~0x700) | (mode << 8))
    return bytes(regs)
