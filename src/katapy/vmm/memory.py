"""Guest physical memory.

Guest RAM is a list of regions, each backed by a memfd (so the same pages can
be handed to a vhost-user back end or to KVM) and mapped once into this
process.  Every access takes a :class:`GuestAddress` and a length and is
bounds-checked against the regions: an address the guest made up can never
make the VMM touch memory outside guest RAM (the vm-memory crate's contract).

An access must lie inside one region; ranges that straddle two regions are
refused, as rust-vmm's ``GuestMemoryMmap::get_slice`` does.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Iterable


class GuestAddress(int):
    """A guest-physical address; never to be confused with a host pointer."""

    __slots__ = ()

    def __add__(self, other: int) -> "GuestAddress":  # type: ignore[override]
        return GuestAddress(int(self) + int(other))

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"


class GuestMemoryError(Exception):
    """The guest (or a caller) named memory that is not guest RAM."""


@dataclass
class MemoryRegion:
    """One contiguous range of guest RAM and the host mapping behind it."""

    guest_base: GuestAddress
    size: int
    fd: int  # memfd (or the fd a vhost-user front end sent); owned by the region
    fd_offset: int = 0
    mapping: mmap.mmap = field(repr=False, default=None)  # type: ignore[assignment]
    host_addr: int = 0  # address of the mapping in this process (for KVM_SET_USER_MEMORY_REGION)

    @property
    def guest_end(self) -> int:
        return int(self.guest_base) + self.size

    def contains(self, addr: int, length: int) -> bool:
        return int(self.guest_base) <= addr and addr + length <= self.guest_end and length >= 0


def _host_address(m: mmap.mmap) -> int:
    buf = (ctypes.c_char * 1).from_buffer(m)
    try:
        return ctypes.addressof(buf)
    finally:
        del buf


class GuestMemory:
    """Guest RAM: bounds-checked reads and writes by guest-physical address."""

    def __init__(self, regions: Iterable[MemoryRegion]):
        self.regions: list[MemoryRegion] = sorted(regions, key=lambda r: int(r.guest_base))
        for a, b in zip(self.regions, self.regions[1:]):
            if a.guest_end > int(b.guest_base):
                raise GuestMemoryError(f"overlapping memory regions at {b.guest_base!r}")
        self._closed = False

    # -- construction -------------------------------------------------------
    @classmethod
    def create(cls, layout: Iterable[tuple[int, int]], name: str = "katapy-guest-ram") -> "GuestMemory":
        """Allocate anonymous shared RAM for ``[(guest_base, size), ...]`` backed by memfds."""
        regions = []
        try:
            for base, size in layout:
                if size <= 0 or size % mmap.PAGESIZE:
                    raise GuestMemoryError(f"region size {size:#x} is not a positive multiple of the page size")
                fd = os.memfd_create(name, os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                regions.append(MemoryRegion(GuestAddress(base), size, fd, 0, m, _host_address(m)))
        except BaseException:
            for r in regions:
                r.mapping.close()
                os.close(r.fd)
            raise
        return cls(regions)

    @classmethod
    def from_fds(cls, specs: Iterable[tuple[int, int, int, int]]) -> "GuestMemory":
        """Map regions described by ``(guest_base, size, fd, fd_offset)``; takes ownership of the fds.

        This is how a vhost-user back end sees the front end's RAM
        (VHOST_USER_SET_MEM_TABLE): the offset is the ``mmap_offset`` field.
        """
        regions = []
        try:
            for base, size, fd, offset in specs:
                total = offset + size
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size < total:
                    # pages past the end of the file would SIGBUS the VMM at the first access
                    raise GuestMemoryError(f"region {base:#x}+{size:#x} at offset {offset:#x} runs past the "
                                           f"end of its {st.st_size:#x}-byte file")
                m = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                regions.append(MemoryRegion(GuestAddress(base), size, fd, offset, m, _host_address(m) + offset))
        except BaseException:
            for r in regions:
                r.mapping.close()
                os.close(r.fd)
            raise
        return cls(regions)

    # -- hotplug (katapy.vmm.memory_hotplug) ----------------------------------
    def add_region(self, base: int, size: int, name: str = "katapy-hotplug-ram") -> MemoryRegion:
        """Allocate and map one more memfd-backed region at ``base`` (it must overlap nothing).

        The region list is replaced, not mutated, so a device thread iterating
        the old list in :meth:`find_region` sees either list, never half of one.
        """
        if size <= 0 or size % mmap.PAGESIZE or base % mmap.PAGESIZE:
            raise GuestMemoryError(f"region {base:#x}+{size:#x} is not page-aligned and non-empty")
        if any(int(r.guest_base) < base + size and base < r.guest_end for r in self.regions):
            raise GuestMemoryError(f"region {base:#x}+{size:#x} overlaps guest RAM")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        region = MemoryRegion(GuestAddress(base), size, fd, 0, m, _host_address(m))
        self.regions = sorted([*self.regions, region], key=lambda r: int(r.guest_base))
        return region

    def remove_region(self, base: int) -> MemoryRegion:
        """Drop the region starting at ``base`` from guest RAM and give its pages back to the host.

        The pages are released with MADV_REMOVE (the memfd's backing is punched
        out) even if a device thread still holds a view of the mapping, which
        then reads zeros; the mapping and the fd are closed when no view is left.
        """
        region = next((r for r in self.regions if int(r.guest_base) == base), None)
        if region is None:
            raise GuestMemoryError(f"no guest RAM region starts at {base:#x}")
        self.regions = [r for r in self.regions if r is not region]
        try:
            region.mapping.madvise(mmap.MADV_REMOVE)
        except (OSError, ValueError):
            pass  # a closed mapping: nothing left to release
        try:
            region.mapping.close()
        except BufferError:
            pass  # a memoryview is still alive; the (now empty) mapping goes when it does
        os.close(region.fd)
        region.fd = -1
        return region

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for r in self.regions:
            try:
                r.mapping.close()
            except BufferError:
                pass  # a memoryview is still alive; the mapping goes when it does
            os.close(r.fd)

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookup -------------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def find_region(self, addr: int, length: int = 1) -> MemoryRegion:
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {addr:#x}+{length:#x}")
        for r in self.regions:
            if r.contains(addr, length):
                return r
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is outside guest RAM")

    def check_range(self, addr: int, length: int) -> bool:
        try:
            self.find_region(addr, length)
            return True
        except GuestMemoryError:
            return False

    def slice(self, addr: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes of guest RAM at ``addr`` (zero-copy)."""
        r = self.find_region(addr, length)
        off = r.fd_offset + (addr - int(r.guest_base))
        return memoryview(r.mapping)[off : off + length]

    # -- access -------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        r = self.find_region(addr, length)
        off = r.fd_offset + (addr - int(r.guest_base))
        return r.mapping[off : off + length]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        r = self.find_region(addr, length)
        off = r.fd_offset + (addr - int(r.guest_base))
        r.mapping[off : off + length] = data

    def _unpack(self, fmt: str, addr: int) -> int:
        s = struct.calcsize(fmt)
        r = self.find_region(addr, s)
        return struct.unpack_from(fmt, r.mapping, r.fd_offset + addr - int(r.guest_base))[0]

    def _pack(self, fmt: str, addr: int, value: int) -> None:
        s = struct.calcsize(fmt)
        r = self.find_region(addr, s)
        struct.pack_into(fmt, r.mapping, r.fd_offset + addr - int(r.guest_base), value)

    def read_u8(self, addr: int) -> int:
        return self._unpack("<B", addr)

    def read_u16(self, addr: int) -> int:
        return self._unpack("<H", addr)

    def read_u32(self, addr: int) -> int:
        return self._unpack("<I", addr)

    def read_u64(self, addr: int) -> int:
        return self._unpack("<Q", addr)

    def write_u8(self, addr: int, v: int) -> None:
        self._pack("<B", addr, v)

    def write_u16(self, addr: int, v: int) -> None:
        self._pack("<H", addr, v)

    def write_u32(self, addr: int, v: int) -> None:
        self._pack("<I", addr, v)

    def write_u64(self, addr: int, v: int) -> None:
        self._pack("<Q", addr, v)
