"""The KVM vCPU fd: KVM_RUN over the mmapped ``kvm_run`` page, and register state.

Documentation/virt/kvm/api.rst: KVM_RUN (4.10) and section 5 (kvm_run),
KVM_GET/SET_REGS (4.11/4.12), KVM_GET/SET_SREGS (4.13/4.14), KVM_GET/SET_FPU
(4.22/4.23), KVM_GET/SET_MSRS (4.18/4.19), KVM_SET_CPUID2 (4.73),
KVM_GET/SET_LAPIC (4.57/4.58), KVM_GET/SET_MP_STATE (4.38/4.39).

``run()`` returns a typed :mod:`~katapy.vmm.kvm.exits` value; the GIL is
released for the whole of KVM_RUN (the cffi wrapper is a plain C call).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from katapy.vmm.kvm import exits
from katapy.vmm.kvm._ffi import EAGAIN, EINTR, check, ffi, lib
from katapy.vmm.kvm.cpuid import CpuidEntry, cpuid_to_c


@dataclass
class Regs:
    """``struct kvm_regs`` (general-purpose registers, rip, rflags)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2  # bit 1 is reserved and always set


@dataclass
class Segment:
    """``struct kvm_segment``: a segment register's hidden part."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - KVM's field name
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass
class DTable:
    """``struct kvm_dtable`` (GDTR / IDTR)."""

    base: int = 0
    limit: int = 0


_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass
class Sregs:
    """``struct kvm_sregs`` (segments, descriptor tables, control registers, EFER)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, ...] = (0, 0, 0, 0)


@dataclass
class Fpu:
    """The parts of ``struct kvm_fpu`` a VMM sets at boot (x87 control word, MXCSR)."""

    fcw: int = 0x37F
    mxcsr: int = 0x1F80


def _copy_struct_out(c, cls):
    return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})


def _copy_struct_in(obj, c) -> None:
    for f in dataclasses.fields(obj):
        setattr(c, f.name, getattr(obj, f.name))


class VcpuFd:
    """An open KVM vCPU with its ``kvm_run`` page mapped."""

    def __init__(self, fd: int, index: int, mmap_size: int):
        self.fd = fd
        self.index = index
        self._mmap_size = mmap_size
        ptr = lib.katapy_mmap_shared(fd, mmap_size)
        if ptr == ffi.NULL:
            raise OSError(ffi.errno, f"mmap of vCPU {index}'s kvm_run failed")
        self._run_base = ptr
        self._run = ffi.cast("struct kvm_run *", ptr)
        self._bytes = ffi.cast("unsigned char *", ptr)

    def close(self) -> None:
        if self._run_base is not None:
            lib.katapy_munmap(self._run_base, self._mmap_size)
            self._run_base = None
            self._run = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- running ----------------------------------------------------------------
    def set_immediate_exit(self, value: bool) -> None:
        """kvm_run.immediate_exit: KVM_RUN returns EINTR at once while set (KVM_CAP_IMMEDIATE_EXIT)."""
        if self._run is not None:
            self._run.immediate_exit = 1 if value else 0

    def run(self) -> exits.VcpuExit:
        """Enter the guest until the next exit (the GIL is released meanwhile)."""
        r = lib.katapy_kvm_run(self.fd)
        if r < 0:
            if -r in (EINTR, EAGAIN):
                return exits.Interrupted()
            check(r, "KVM_RUN")
        return self._decode()

    def _decode(self) -> exits.VcpuExit:
        run = self._run
        reason = run.exit_reason
        if reason == lib.KVM_EXIT_IO:
            io = run.io
            size, count = io.size, io.count
            if io.direction == lib.KVM_EXIT_IO_OUT:
                data = bytes(ffi.buffer(self._bytes + io.data_offset, size * count))
                return exits.IoOut(io.port, size, data, count)
            return exits.IoIn(io.port, size, count)
        if reason == lib.KVM_EXIT_MMIO:
            m = run.mmio
            length = min(m.len, 8)
            if m.is_write:
                return exits.MmioWrite(m.phys_addr, bytes(ffi.buffer(m.data, length)))
            return exits.MmioRead(m.phys_addr, length)
        if reason == lib.KVM_EXIT_HLT:
            return exits.Hlt()
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return exits.Shutdown()
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            ev = run.system_event
            return exits.SystemEvent(ev.type, tuple(ev.data[i] for i in range(min(ev.ndata, 16))))
        if reason == lib.KVM_EXIT_IOAPIC_EOI:
            return exits.IoapicEoi(run.eoi.vector)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            ie = run.internal
            return exits.InternalError(ie.suberror, tuple(ie.data[i] for i in range(min(ie.ndata, 16))))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return exits.FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
        if reason == lib.KVM_EXIT_INTR:
            return exits.Interrupted()
        return exits.Unknown(reason, run.hw.hardware_exit_reason if reason == lib.KVM_EXIT_UNKNOWN else 0)

    def complete_io_in(self, data: bytes) -> None:
        """Answer the pending IoIn: ``data`` (size*count bytes) is what the guest's ``in`` reads."""
        io = self._run.io
        n = io.size * io.count
        ffi.memmove(self._bytes + io.data_offset, data[:n].ljust(n, b"\xff"), n)

    def complete_mmio_read(self, data: bytes) -> None:
        """Answer the pending MmioRead."""
        m = self._run.mmio
        n = min(m.len, 8)
        ffi.memmove(m.data, data[:n].ljust(n, b"\0"), n)

    # -- registers --------------------------------------------------------------
    def get_regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_GET_REGS, c), "KVM_GET_REGS")
        return _copy_struct_out(c, Regs)

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *")
        _copy_struct_in(regs, c)
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_REGS, c), "KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        c = ffi.new("struct kvm_sregs *")
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_GET_SREGS, c), "KVM_GET_SREGS")
        s = Sregs()
        for name in _SEGMENTS:
            setattr(s, name, _copy_struct_out(getattr(c, name), Segment))
        s.gdt = _copy_struct_out(c.gdt, DTable)
        s.idt = _copy_struct_out(c.idt, DTable)
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(s, name, getattr(c, name))
        s.interrupt_bitmap = tuple(c.interrupt_bitmap)
        return s

    def set_sregs(self, s: Sregs) -> None:
        c = ffi.new("struct kvm_sregs *")
        for name in _SEGMENTS:
            _copy_struct_in(getattr(s, name), getattr(c, name))
        _copy_struct_in(s.gdt, c.gdt)
        _copy_struct_in(s.idt, c.idt)
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(c, name, getattr(s, name))
        for i, v in enumerate(s.interrupt_bitmap):
            c.interrupt_bitmap[i] = v
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_SREGS, c), "KVM_SET_SREGS")

    def set_fpu(self, fpu: Fpu) -> None:
        c = ffi.new("struct kvm_fpu *")
        c.fcw, c.mxcsr = fpu.fcw, fpu.mxcsr
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_FPU, c), "KVM_SET_FPU")

    def get_fpu(self) -> Fpu:
        c = ffi.new("struct kvm_fpu *")
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_GET_FPU, c), "KVM_GET_FPU")
        return Fpu(c.fcw, c.mxcsr)

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """Set MSRs; returns how many KVM accepted (it stops at the first it refuses)."""
        n = len(msrs)
        c = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        c.nmsrs = n
        for i, (index, value) in enumerate(msrs.items()):
            c.entries[i].index, c.entries[i].data = index, value
        return check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_MSRS, c), "KVM_SET_MSRS")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        n = len(indices)
        c = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        c.nmsrs = n
        for i, index in enumerate(indices):
            c.entries[i].index = index
        got = check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_GET_MSRS, c), "KVM_GET_MSRS")
        return {c.entries[i].index: c.entries[i].data for i in range(got)}

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, cpuid_to_c(entries)), "KVM_SET_CPUID2")

    def get_lapic(self) -> bytes:
        c = ffi.new("struct kvm_lapic_state *")
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_GET_LAPIC, c), "KVM_GET_LAPIC")
        return bytes(ffi.buffer(c.regs))

    def set_lapic(self, regs: bytes) -> None:
        c = ffi.new("struct kvm_lapic_state *")
        size = ffi.sizeof(c.regs)
        ffi.memmove(c.regs, regs[:size], min(size, len(regs)))
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_LAPIC, c), "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        c = ffi.new("struct kvm_mp_state *")
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, c), "KVM_GET_MP_STATE")
        return c.mp_state

    def set_mp_state(self, state: int) -> None:
        c = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_MP_STATE, c), "KVM_SET_MP_STATE")
