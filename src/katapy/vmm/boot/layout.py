"""Guest-physical layout of an x86_64 katapy VM (Firecracker's arch/x86_64/layout.rs, with the GDT
following the Linux 64-bit boot protocol's selectors).

Low memory (below 1 MiB) holds the boot structures; the kernel goes to 1 MiB
(bzImage) or to its ELF physical addresses (vmlinux, 16 MiB); the initrd sits
at the top of low RAM; 0xd0000000-0xffffffff is the MMIO hole (virtio-mmio
devices from 0xd0000000, IOAPIC at 0xfec00000, LAPIC at 0xfee00000); RAM that
does not fit below the hole continues at 4 GiB.
"""
from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

BOOT_GDT_START = 0x500
BOOT_IDT_START = 0x530
PVH_INFO_START = 0x6000  # struct hvm_start_info (PVH boot)
PVH_MODLIST_START = 0x6040  # one hvm_modlist_entry (the initrd)
PVH_MEMMAP_START = 0x7000  # hvm_memmap_table_entry[] (PVH boot)
ZERO_PAGE_START = 0x7000  # struct boot_params (Linux boot protocol)
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000  # four page directories: 0xb000-0xefff map the first 4 GiB with 2 MiB pages
IDENTITY_MAPPED_GIB = 4
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 2048  # COMMAND_LINE_SIZE on x86
EBDA_START = 0x9FC00  # RAM below this is usable; the MP table lives here
MPTABLE_START = 0x9FC00
MPTABLE_MAX_SIZE = 0x10000  # may run past 0xa0000 into the (non-RAM in e820) legacy hole
HIMEM_START = 0x100000  # 1 MiB: where the protected-mode kernel is loaded

MMIO_MEM_START = 0xD000_0000  # start of the 32-bit MMIO hole (768 MiB below 4 GiB)
FIRST_ADDR_PAST_32BITS = 1 << 32
IOAPIC_ADDR = 0xFEC0_0000
APIC_DEFAULT_PHYS_BASE = 0xFEE0_0000

# virtio-mmio device windows (Firecracker device_manager/mmio.rs)
MMIO_DEVICE_LEN = 0x1000
VIRTIO_IRQ_BASE = 5  # IRQs 5.. go to virtio devices (4 is the serial port)
VIRTIO_IRQ_MAX = 23  # last IOAPIC pin


def ram_regions(mem_size: int) -> list[tuple[int, int]]:
    """The guest RAM regions for ``mem_size`` bytes: one below the MMIO hole, the rest above 4 GiB."""
    if mem_size <= 0 or mem_size % (4 * KIB):
        raise ValueError(f"guest memory size {mem_size:#x} must be a positive multiple of 4 KiB")
    if mem_size < 2 * MIB:
        raise ValueError("guest memory must be at least 2 MiB")
    if mem_size <= MMIO_MEM_START:
        return [(0, mem_size)]
    return [(0, MMIO_MEM_START), (FIRST_ADDR_PAST_32BITS, mem_size - MMIO_MEM_START)]


def low_ram_end(mem_size: int) -> int:
    """End of RAM below the MMIO hole."""
    return min(mem_size, MMIO_MEM_START)
