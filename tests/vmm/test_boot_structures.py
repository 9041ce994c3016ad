"""Boot structures checked field by field against the x86 boot protocol, the MP spec and the SDM."""
from __future__ import annotations

import struct

import pytest

from katapy import paths
from katapy.vmm.boot import e820, gdt, layout, mptable, paging, pvh, zeropage
from katapy.vmm.boot import setup_header as sh
from katapy.vmm.boot.cpuid import KVM_CPUID_SIGNATURE, vcpu_cpuid
from katapy.vmm.boot.loader import (
    BootProtocol,
    KernelLoadError,
    initrd_address,
    load_bzimage,
    load_elf,
    load_kernel,
)
from katapy.vmm.kvm.cpuid import CpuidEntry
from katapy.vmm.memory import GuestMemory

GIB = 1 << 30


def test_e820_small_and_large_ram():
    small = e820.memory_map(256 << 20)
    assert small[0] == e820.E820Entry(0, 0x9FC00, e820.E820_RAM)
    assert small[1].type == e820.E820_RESERVED and small[1].addr == 0x9FC00
    assert small[2] == e820.E820Entry(0x100000, (256 << 20) - 0x100000, e820.E820_RAM)
    big = e820.memory_map(4 * GIB)
    assert big[2] == e820.E820Entry(0x100000, 0xD0000000 - 0x100000, e820.E820_RAM)
    assert big[3] == e820.E820Entry(1 << 32, 4 * GIB - 0xD0000000, e820.E820_RAM)
    assert not any(e.addr < 1 << 32 < e.addr + e.size or 0xD0000000 <= e.addr < 1 << 32 for e in big)
    assert layout.ram_regions(4 * GIB) == [(0, 0xD0000000), (1 << 32, 4 * GIB - 0xD0000000)]


def test_zero_page_fields():
    mm = e820.memory_map(512 << 20)
    page = zeropage.build(0x20000, 11, mm, (0x1F000000, 0x1234))
    assert len(page) == 4096
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert struct.unpack_from("<I", page, 0x202)[0] == 0x53726448
    assert page[0x210] == 0xFF  # type_of_loader
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x20000
    assert struct.unpack_from("<I", page, 0x238)[0] == 11
    assert struct.unpack_from("<II", page, 0x218) == (0x1F000000, 0x1234)
    assert page[0x1E8] == len(mm)
    for i, e in enumerate(mm):
        assert struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) == (e.addr, e.size, e.type)


def _fake_bzimage(version=0x020F, xloadflags=sh.XLF_KERNEL_64, setup_sects=2, payload=b"\x90" * 4096) -> bytes:
    img = bytearray(512 * (setup_sects + 1))
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200], img[0x201] = 0xEB, 0x6A  # jmp over the header: it ends at 0x26c
    struct.pack_into("<I", img, 0x202, 0x53726448)
    struct.pack_into("<H", img, 0x206, version)
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", img, 0x230, 0x200000)
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, 2047)
    struct.pack_into("<Q", img, 0x258, 0x1000000)
    struct.pack_into("<I", img, 0x260, 0x800000)
    return bytes(img) + payload


def test_bzimage_loader_and_header_copy():
    with GuestMemory.create([(0, 64 << 20)]) as mem:
        k = load_bzimage(mem, _fake_bzimage())
        assert k.entry == 0x100000 + 0x200 and k.protocol is BootProtocol.LINUX64
        assert mem.read(0x100000, 16) == b"\x90" * 16
        assert k.header.setup_size == 3 * 512 and k.header.initrd_addr_max == 0x7FFFFFFF
        assert k.kernel_end == 0x1000000 + 0x800000  # pref_address + init_size
        page = zeropage.build(0x20000, 3, [], None, k.header)
        assert struct.unpack_from("<I", page, 0x230)[0] == 0x200000  # copied from the image
        assert page[0x210] == 0xFF and page[0x211] & sh.LOADFLAG_LOADED_HIGH
        with pytest.raises(KernelLoadError, match="XLF_KERNEL_64"):
            load_bzimage(mem, _fake_bzimage(xloadflags=0))
        with pytest.raises(KernelLoadError, match="not a bzImage"):
            load_bzimage(mem, b"\0" * 4096)
        with pytest.raises(KernelLoadError, match="older than 2.06"):
            load_bzimage(mem, _fake_bzimage(version=0x0204))


def test_elf_loader_refuses_bad_images():
    with GuestMemory.create([(0, 16 << 20)]) as mem:
        with pytest.raises(KernelLoadError):
            load_elf(mem, b"\x7fELF" + b"\0" * 60)


def test_initrd_placement():
    addr = initrd_address(512 << 20, 10_000, 0x2000000, 0x7FFFFFFF)
    assert addr % 4096 == 0 and addr + 10_000 <= 512 << 20 and addr >= (512 << 20) - 16384
    # respects initrd_addr_max and the MMIO hole
    assert initrd_address(8 * GIB, 4096, 0x2000000, 0x37FFFFFF) + 4096 <= 0x38000000
    assert initrd_address(8 * GIB, 4096, 0x2000000, 0xFFFFFFFF) + 4096 <= 0xD0000000
    with pytest.raises(KernelLoadError):
        initrd_address(64 << 20, 60 << 20, 0x2000000, 0x7FFFFFFF)  # would overlap the kernel


def test_page_tables_identity_map_4gib():
    pages = paging.build_page_tables()
    pml4 = struct.unpack("<512Q", pages[layout.PML4_START])
    assert pml4[0] == layout.PDPTE_START | 3 and not any(pml4[1:])
    pdpt = struct.unpack("<512Q", pages[layout.PDPTE_START])
    for gib in range(4):
        assert pdpt[gib] == (layout.PDE_START + gib * 4096) | 3
        pd = struct.unpack("<512Q", pages[pdpt[gib] & ~0xFFF])
        for i in (0, 1, 511):
            assert pd[i] == ((gib << 30) | (i << 21)) | 0x83  # present, writable, 2 MiB page


def test_gdt_entries_decode_to_boot_segments():
    entries = gdt.boot_gdt(long_mode=True)
    assert entries[0] == 0 and entries[1] == 0
    assert entries[2] == 0x00AF9B000000FFFF  # 64-bit code, flat
    assert entries[3] == 0x00CF93000000FFFF  # data, flat
    cs = gdt.segment_from_entry(entries[2], gdt.BOOT_CS)
    assert (cs.l, cs.db, cs.g, cs.present, cs.type, cs.s, cs.limit) == (1, 0, 1, 1, 0xB, 1, 0xFFFFFFFF)
    ds = gdt.segment_from_entry(entries[3], gdt.BOOT_DS)
    assert (ds.l, ds.db, ds.type, ds.selector) == (0, 1, 3, 0x18)
    assert gdt.segment_from_entry(gdt.boot_gdt(long_mode=False)[2], 0x10).db == 1


@pytest.mark.parametrize("cpus", [1, 2, 8, 64])
def test_mptable_layout_and_checksums(cpus):
    t = mptable.build(cpus)
    assert t[:4] == b"_MP_" and sum(t[:16]) % 256 == 0
    table_addr = struct.unpack_from("<I", t, 4)[0]
    off = table_addr - layout.MPTABLE_START
    length = struct.unpack_from("<H", t, off + 4)[0]
    assert t[off : off + 4] == b"PCMP" and sum(t[off : off + length]) % 256 == 0
    count = struct.unpack_from("<H", t, off + 34)[0]
    assert count == cpus + 1 + 1 + 24 + 2
    entries = t[off + 44 : off + length]
    procs = [entries[i * 20 : i * 20 + 20] for i in range(cpus)]
    assert [p[1] for p in procs] == list(range(cpus))  # APIC ids
    assert procs[0][3] == 3 and all(p[3] == 1 for p in procs[1:])  # BSP flag only on cpu 0
    ioapic = entries[cpus * 20 + 8 : cpus * 20 + 16]
    assert ioapic[0] == 2 and ioapic[1] == cpus + 1 and struct.unpack_from("<I", ioapic, 4)[0] == 0xFEC00000
    with pytest.raises(mptable.MpTableError):
        mptable.build(0)


def test_cpuid_per_vcpu():
    supported = [
        CpuidEntry(1, 0, 0, 0x806F0, 0x00000800, 0, 0),
        CpuidEntry(0xB, 0, 1, 0, 0, 0, 0),
        CpuidEntry(0xB, 1, 1, 0, 0, 0, 0),
        CpuidEntry(0xA, 0, 0, 0x7300402, 0, 0, 0x603),
    ]
    for vid in range(3):
        leaves = {(e.function, e.index): e for e in vcpu_cpuid(supported, vid, 3)}
        assert leaves[(1, 0)].ebx >> 24 == vid
        assert leaves[(1, 0)].ecx >> 31 == 1  # hypervisor bit
        assert leaves[(1, 0)].edx >> 28 & 1 == 1  # HTT with >1 logical processors
        assert leaves[(0xB, 1)].ebx == 3 and leaves[(0xB, 0)].edx == vid
        assert (leaves[(0xA, 0)].eax, leaves[(0xA, 0)].edx) == (0, 0)
        sig = leaves[(KVM_CPUID_SIGNATURE, 0)]
        assert struct.pack("<3I", sig.ebx, sig.ecx, sig.edx) == b"KVMKVMKVM\0\0\0"
    assert supported[0].ebx == 0x800  # the input is not modified
    with pytest.raises(ValueError):
        vcpu_cpuid(supported, 3, 3)


def test_pvh_start_info_layout():
    si = pvh.start_info(0x20000, 4, (0x3000000, 0x1000))
    assert len(si) == pvh.START_INFO_SIZE
    magic, version, flags, nmods, modlist, cmdline, rsdp, memmap, nmap, _ = struct.unpack("<IIIIQQQQII", si)
    assert (magic, version, nmods, modlist, cmdline, memmap, nmap) == (
        0x336EC578, 1, 1, layout.PVH_MODLIST_START, 0x20000, layout.PVH_MEMMAP_START, 4)
    assert struct.unpack("<QQII", pvh.memmap([e820.E820Entry(0, 0x9FC00, 1)])) == (0, 0x9FC00, 1, 0)


def _artifact(p):
    if not p.exists():
        pytest.skip(f"{p} is not built yet (make kernel)")
    return p


def test_real_vmlinux_loads():
    vmlinux = _artifact(paths.guest_vmlinux())
    with GuestMemory.create(layout.ram_regions(256 << 20)) as mem:
        k = load_kernel(mem, vmlinux)
        assert k.protocol is BootProtocol.LINUX64 and k.kernel_start >= 0x100000
        assert k.kernel_start <= k.entry < k.kernel_end


def test_real_bzimage_loads():
    bz = _artifact(paths.guest_bzimage())
    with GuestMemory.create(layout.ram_regions(256 << 20)) as mem:
        k = load_kernel(mem, bz)
        assert k.entry == 0x100200 and k.header.version >= 0x020C
        assert k.header.xloadflags & sh.XLF_KERNEL_64
