"""Per-vCPU CPUID, derived from KVM_GET_SUPPORTED_CPUID (Intel SDM vol. 2A "CPUID";
AMD APM vol. 3 appendix E; Documentation/virt/kvm/x86/cpuid.rst).

KVM reports what it *can* virtualise; each vCPU then gets its own identity:
the initial APIC id in leaf 1 and the x2APIC id in leaves 0xb/0x1f, a
topology of ``vcpu_count`` cores in one package with one thread per core, the
hypervisor bit, the TSC-deadline timer when KVM has it, no performance
monitoring (leaf 0xa cleared), and the KVM paravirtual leaves at 0x40000000
("KVMKVMKVM", Documentation/virt/kvm/x86/cpuid.rst).
"""
from __future__ import annotations

import copy
import struct

from katapy.vmm.kvm.cpuid import CpuidEntry

KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
FLAG_SIGNIFICANT_INDEX = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX

LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28


def _signature_regs() -> tuple[int, int, int]:
    return struct.unpack("<3I", KVM_SIGNATURE)  # type: ignore[return-value]


def _bits_for(n: int) -> int:
    """Number of APIC-id bits needed to number ``n`` items."""
    return max(0, (n - 1).bit_length())


def vcpu_cpuid(
    supported: list[CpuidEntry], vcpu_id: int, vcpu_count: int, tsc_deadline: bool = True
) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``vcpu_id`` of ``vcpu_count``."""
    if not 0 <= vcpu_id < vcpu_count <= 255:
        raise ValueError(f"vCPU {vcpu_id} of {vcpu_count}: ids must be below the count, count at most 255")
    out = [copy.copy(e) for e in supported]
    core_bits = _bits_for(vcpu_count)
    has_kvm_leaf = False
    for e in out:
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (vcpu_id << 24) | (8 << 8)  # APIC id, CLFLUSH size 8*8
            e.ebx = (e.ebx & 0xFF00FFFF) | ((vcpu_count if vcpu_count > 1 else 1) << 16)
            e.ecx |= LEAF1_ECX_HYPERVISOR
            if tsc_deadline:
                e.ecx |= LEAF1_ECX_TSC_DEADLINE
            if vcpu_count > 1:
                e.edx |= LEAF1_EDX_HTT
            else:
                e.edx &= ~LEAF1_EDX_HTT
        elif e.function == 4:
            # Deterministic cache parameters: cores per package - 1 in eax[31:26];
            # L1/L2 are per core (1 thread), L3 is shared by all cores.
            cache_level = (e.eax >> 5) & 0x7
            sharing = vcpu_count if cache_level >= 3 else 1
            e.eax = (e.eax & 0x3FFF) | ((sharing - 1) << 14) | ((vcpu_count - 1) << 26)
        elif e.function == 6:
            e.ecx &= ~(1 << 3)  # no energy-performance bias MSR
        elif e.function == 0xA:
            e.eax = e.ebx = e.ecx = e.edx = 0  # no architectural PMU
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu_id  # x2APIC id
            if e.index == 0:  # SMT level: one thread per core
                e.eax, e.ebx, e.ecx = 0, 1, (1 << 8) | 0
            elif e.index == 1:  # core level
                e.eax, e.ebx, e.ecx = core_bits, vcpu_count, (2 << 8) | 1
            else:
                e.eax, e.ebx, e.ecx = 0, 0, e.index
        elif e.function == 0x80000008:
            # AMD: ecx[7:0] = number of threads - 1, ecx[15:12] = APIC id size.
            e.ecx = (e.ecx & ~0xF0FF) | (vcpu_count - 1) | (core_bits << 12)
        elif e.function == KVM_CPUID_SIGNATURE:
            has_kvm_leaf = True
            e.ebx, e.ecx, e.edx = _signature_regs()
            e.eax = max(e.eax, KVM_CPUID_FEATURES)
    if not has_kvm_leaf:
        ebx, ecx, edx = _signature_regs()
        out.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, ebx, ecx, edx))
    return out
