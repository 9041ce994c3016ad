"""CPUID entries as KVM passes them (``struct kvm_cpuid2`` / ``struct kvm_cpuid_entry2``).

Documentation/virt/kvm/api.rst: KVM_GET_SUPPORTED_CPUID (4.46) fills the
list on the system fd (``system``), KVM_SET_CPUID2 (4.73) hands one to a vCPU
(``vcpu``); the guest's CPUID policy in between is ``katapy.vmm.boot.cpuid``.
A module of its own so that ``vcpu`` does not import ``system`` (which
creates VMs, which create vCPUs).
"""
from __future__ import annotations

from dataclasses import dataclass

from katapy.vmm.kvm._ffi import ffi

#: enough for any CPU KVM knows of (KVM_MAX_CPUID_ENTRIES is 256)
MAX_CPUID_ENTRIES = 256


@dataclass
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def cpuid_to_c(entries: list[CpuidEntry]):  # -> cdata struct kvm_cpuid2 *
    c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, e in enumerate(entries):
        ce = c.entries[i]
        ce.function, ce.index, ce.flags = e.function, e.index, e.flags
        ce.eax, ce.ebx, ce.ecx, ce.edx = e.eax, e.ebx, e.ecx, e.edx
    c.nent = len(entries)
    return c


def cpuid_from_c(c) -> list[CpuidEntry]:
    return [
        CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in (c.entries[i] for i in range(c.nent))
    ]
