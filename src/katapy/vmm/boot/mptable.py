"""The Intel MultiProcessor Specification 1.4 table (chapter 4) that tells a kernel without ACPI
about the vCPUs, the IOAPIC and how the ISA IRQs are wired.

Layout as Firecracker's arch/x86_64/mptable.rs: the MP floating pointer at
0x9fc00 (in the EBDA, where Linux's smp_scan_config looks), the
configuration table right after it, then one processor entry per vCPU, the
ISA bus, the IOAPIC (id = vcpus + 1), an I/O interrupt entry per IOAPIC pin
(ISA IRQ n -> pin n, bus-default polarity and trigger) and the two local
interrupt entries (ExtINT on LINT0, NMI on LINT1).
"""
from __future__ import annotations

import struct

from katapy.vmm.boot import layout

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MPC_SPEC = 4
MPC_OEM = b"KATAPY  "
MPC_PRODUCT_ID = b"000000000000"
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
CPU_STEPPING = 0x600
CPU_FEATURE_APIC = 0x200
CPU_FEATURE_FPU = 0x001
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
MP_IRQTYPE_INT, MP_IRQTYPE_NMI, MP_IRQTYPE_EXTINT = 0, 1, 3
MPC_APIC_USABLE = 1
IOAPIC_PINS = 24
MAX_SUPPORTED_CPUS = 254  # APIC ids 0..vcpus-1 plus the IOAPIC's id must fit in 8 bits


class MpTableError(ValueError):
    pass


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _with_checksum(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] = 0
    b[offset] = checksum(bytes(b))
    return bytes(b)


def build(num_cpus: int, base: int = layout.MPTABLE_START) -> bytes:
    """The whole MP table region starting at ``base``."""
    if not 1 <= num_cpus <= MAX_SUPPORTED_CPUS:
        raise MpTableError(f"{num_cpus} vCPUs: the MP table supports 1..{MAX_SUPPORTED_CPUS}")
    ioapic_id = num_cpus + 1
    entries = bytearray()
    for cpu in range(num_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += struct.pack(
            "<BBBBII8x", MP_PROCESSOR, cpu, APIC_VERSION, flags, CPU_STEPPING, CPU_FEATURE_APIC | CPU_FEATURE_FPU
        )
    entries += struct.pack("<BB6s", MP_BUS, 0, b"ISA   ")
    entries += struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE, layout.IOAPIC_ADDR)
    for irq in range(IOAPIC_PINS):
        entries += struct.pack("<BBHBBBB", MP_INTSRC, MP_IRQTYPE_INT, 0, 0, irq, ioapic_id, irq)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_IRQTYPE_EXTINT, 0, 0, 0, 0, 0)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_IRQTYPE_NMI, 0, 0, 0, 0xFF, 1)
    count = num_cpus + 1 + 1 + IOAPIC_PINS + 2

    header_size = 44
    table_addr = base + 16
    header = struct.pack(
        "<4sHBB8s12sIHHIHBB",
        MPC_SIGNATURE,
        header_size + len(entries),
        MPC_SPEC,
        0,  # checksum, below
        MPC_OEM,
        MPC_PRODUCT_ID,
        0,  # OEM table pointer
        0,  # OEM table size
        count,
        layout.APIC_DEFAULT_PHYS_BASE,
        0,  # extended table length
        0,  # extended table checksum
        0,
    )
    config = _with_checksum(header + bytes(entries), 7)
    mpf = _with_checksum(struct.pack("<4sIBBB5x", MPF_SIGNATURE, table_addr, 1, MPC_SPEC, 0), 10)
    table = mpf + config
    if len(table) > layout.MPTABLE_MAX_SIZE:
        raise MpTableError(f"MP table of {len(table)} bytes does not fit the EBDA window")
    return table
