"""Kernel loaders: ELF vmlinux (PT_LOAD segments; optional PVH entry) and bzImage (Linux boot protocol).

* ELF (System V gABI, "Program Header"): every PT_LOAD segment is copied to
  its physical address ``p_paddr`` and zero-filled up to ``p_memsz``; the
  entry is ``e_entry`` (x86 vmlinux links ``ENTRY(phys_startup_64)``, a
  physical address).  A PT_NOTE with name "Xen" and type
  XEN_ELFNOTE_PHYS32_ENTRY (18) gives the PVH 32-bit entry point
  (xen/include/public/elfnote.h; Linux arch/x86/platform/pvh/head.S).
* bzImage (Documentation/arch/x86/boot.rst): the setup header at 0x1f1, the
  protected-mode kernel after ``(setup_sects + 1) * 512`` bytes, loaded at
  1 MiB; the 64-bit entry point is load address + 0x200 (boot.rst, "64-bit
  Boot Protocol"), which needs XLF_KERNEL_64 in xloadflags.

Everything from the file is checked: segments must lie in guest RAM above
1 MiB and inside the file.
"""
from __future__ import annotations

import enum
import io
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from katapy.vmm.boot import layout
from katapy.vmm.boot.setup_header import XLF_KERNEL_64, SetupHeader, SetupHeaderError
from katapy.vmm.memory import GuestMemory, GuestMemoryError

XEN_ELFNOTE_PHYS32_ENTRY = 18
BZIMAGE_64BIT_ENTRY_OFFSET = 0x200


class BootProtocol(enum.Enum):
    LINUX64 = "linux64"  # 64-bit Linux boot protocol, %rsi = zero page
    PVH = "pvh"  # 32-bit PVH entry, %ebx = hvm_start_info


class KernelLoadError(ValueError):
    pass


@dataclass
class LoadedKernel:
    entry: int
    protocol: BootProtocol
    kernel_start: int
    kernel_end: int  # first byte after the loaded image (p_memsz included)
    header: SetupHeader | None = None  # bzImage only
    pvh_entry: int | None = None  # ELF with a PVH note


def _elf_notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) for each note in a PT_NOTE blob (gABI "Note Section", 4-byte alignment)."""
    notes = []
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name_end = off + namesz
        desc_off = off + ((namesz + 3) & ~3)
        desc_end = desc_off + descsz
        if desc_end > len(data):
            break
        notes.append((data[off:name_end].rstrip(b"\0"), ntype, data[desc_off:desc_end]))
        off = desc_off + ((descsz + 3) & ~3)
    return notes


def pvh_entry_of(elf: ELFFile) -> int | None:
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_NOTE":
            continue
        for name, ntype, desc in _elf_notes(seg.data()):
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
                return int.from_bytes(desc, "little")
    return None


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def load_elf(mem: GuestMemory, data: bytes, protocol: BootProtocol = BootProtocol.LINUX64) -> LoadedKernel:
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise KernelLoadError("kernel ELF is not x86_64 (ELFCLASS64, EM_X86_64)")
        start, end = None, 0
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            paddr, filesz, memsz, offset = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"], seg["p_offset"]
            if paddr < layout.HIMEM_START:
                raise KernelLoadError(f"PT_LOAD at {paddr:#x} is below 1 MiB")
            if filesz > memsz or offset + filesz > len(data):
                raise KernelLoadError("PT_LOAD segment extends past the file")
            if not mem.check_range(paddr, memsz):
                raise KernelLoadError(f"PT_LOAD {paddr:#x}+{memsz:#x} does not fit in guest RAM")
            mem.write(paddr, data[offset : offset + filesz])
            if memsz > filesz:
                mem.write(paddr + filesz, bytes(memsz - filesz))
            start = paddr if start is None else min(start, paddr)
            end = max(end, paddr + memsz)
        if start is None:
            raise KernelLoadError("kernel ELF has no PT_LOAD segment")
        pvh = pvh_entry_of(elf)
        entry = elf["e_entry"]
    except ELFError as exc:
        raise KernelLoadError(f"bad kernel ELF: {exc}") from exc
    if protocol is BootProtocol.PVH:
        if pvh is None:
            raise KernelLoadError("PVH boot asked for, but the kernel has no XEN_ELFNOTE_PHYS32_ENTRY note")
        entry = pvh
    if not mem.check_range(entry, 1):
        raise KernelLoadError(f"kernel entry point {entry:#x} is outside guest RAM")
    return LoadedKernel(entry, protocol, start, end, None, pvh)


def load_bzimage(mem: GuestMemory, data: bytes) -> LoadedKernel:
    try:
        header = SetupHeader.parse(data)
    except SetupHeaderError as exc:
        raise KernelLoadError(str(exc)) from exc
    if not header.xloadflags & XLF_KERNEL_64:
        raise KernelLoadError("bzImage lacks XLF_KERNEL_64: no 64-bit entry point")
    payload = data[header.setup_size :]
    if not payload:
        raise KernelLoadError("bzImage has no protected-mode kernel after the setup sectors")
    load_addr = layout.HIMEM_START
    try:
        mem.write(load_addr, payload)
    except GuestMemoryError as exc:
        raise KernelLoadError(f"bzImage of {len(payload)} bytes does not fit in guest RAM") from exc
    # init_size counts from the runtime start (pref_address for a relocatable kernel loaded lower).
    end = max(load_addr + len(payload), max(load_addr, header.pref_address) + header.init_size)
    return LoadedKernel(load_addr + BZIMAGE_64BIT_ENTRY_OFFSET, BootProtocol.LINUX64, load_addr, end, header)


def load_kernel(mem: GuestMemory, path: Path, protocol: BootProtocol = BootProtocol.LINUX64) -> LoadedKernel:
    """Load an ELF vmlinux or a bzImage, whichever ``path`` is."""
    data = Path(path).read_bytes()
    if is_elf(data):
        return load_elf(mem, data, protocol)
    if protocol is BootProtocol.PVH:
        raise KernelLoadError("PVH boot needs an ELF vmlinux")
    return load_bzimage(mem, data)


def initrd_address(mem_size: int, initrd_size: int, kernel_end: int, addr_max: int) -> int:
    """Where the initrd goes: the top of low RAM (below the MMIO hole and ``addr_max``), page aligned.

    boot.rst: the initrd must end at or below initrd_addr_max; it must not overlap the kernel.
    """
    top = min(layout.low_ram_end(mem_size), addr_max + 1)
    addr = (top - initrd_size) & ~0xFFF
    if initrd_size <= 0 or addr < kernel_end or addr < layout.HIMEM_START:
        raise KernelLoadError(
            f"initrd of {initrd_size} bytes does not fit between the kernel end {kernel_end:#x} and {top:#x}"
        )
    return addr
