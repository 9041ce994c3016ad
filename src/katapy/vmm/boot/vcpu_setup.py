"""Per-vCPU setup kept from the build, so a vCPU created while the VM runs gets what a boot vCPU got.

The builder (``katapy.vmm.builder``) makes one :class:`VcpuSetup` and configures the boot vCPUs with
it; vCPU hotplug (``katapy.vmm.vcpu_hotplug``) configures the later ones the same way.  Every vCPU's
CPUID describes the VM's ``max_vcpus`` CPUs (APIC id ``i`` for CPU ``i``), as the MP table does, so
topology and enumeration stay the same whichever vCPUs exist (Intel SDM vol. 3A 9.4; KVM api.rst
4.7 KVM_CREATE_VCPU: the vCPU id is its APIC id on x86).

* Kernel boot: an application processor gets CPUID, MSRs and LAPIC LINT pins and stays in its reset
  state (KVM_MP_STATE_UNINITIALIZED under the in-kernel LAPIC) until the guest's INIT-SIPI-SIPI
  (``x86.configure_vcpu``).  A parked vCPU used again needs nothing: the guest sends INIT-SIPI-SIPI
  again when it onlines the CPU, and INIT resets the vCPU in KVM (``kvm_apic_accept_events``).
* Flat boot (tests, firmware-like payloads): no guest kernel sends INIT-SIPI-SIPI, so the VMM makes
  every vCPU runnable at the image's entry itself; a parked vCPU used again is first given back
  the segment/control registers it had when created (its reset state), then the same entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from katapy.vmm.boot import x86
from katapy.vmm.boot.cpuid import vcpu_cpuid
from katapy.vmm.config import FlatBoot
from katapy.vmm.kvm import consts
from katapy.vmm.kvm.cpuid import CpuidEntry
from katapy.vmm.kvm.vcpu import Regs, Sregs, VcpuFd


def flat_vcpu_state(vcpu: VcpuFd, boot: FlatBoot) -> None:
    """Real mode at ``load_addr``: CS base is the 64 KiB block, IP the rest."""
    s = vcpu.get_sregs()
    seg_base = boot.load_addr & ~0xFFFF
    s.cs.base, s.cs.selector = seg_base, seg_base >> 4
    for seg in (s.ds, s.es, s.ss):
        seg.base, seg.selector = 0, 0
    vcpu.set_sregs(s)
    vcpu.set_regs(Regs(rip=boot.load_addr & 0xFFFF, rsp=0x7000 - 0x100 * vcpu.index, rflags=0x2))
    if vcpu.index > 0:
        vcpu.set_mp_state(consts.KVM_MP_STATE_RUNNABLE)  # no INIT/SIPI dance for flat images


@dataclass
class VcpuSetup:
    """How to configure vCPU ``i`` of a VM with ``max_vcpus`` possible CPUs."""

    supported_cpuid: list[CpuidEntry]
    max_vcpus: int
    tsc_deadline: bool
    boot_info: x86.BootInfo | None = None  # kernel boot
    flat: FlatBoot | None = None  # flat boot
    #: flat boot: each vCPU's sregs as KVM created them (its reset state), for :meth:`rearm`
    _reset_sregs: dict[int, Sregs] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (self.boot_info is None) == (self.flat is None):
            raise ValueError("VcpuSetup needs exactly one of boot_info (kernel boot) and flat (flat boot)")

    def configure(self, vcpu: VcpuFd) -> None:
        """The state a vCPU gets right after KVM_CREATE_VCPU (CPUID before the rest: api.rst 4.73)."""
        if not 0 <= vcpu.index < self.max_vcpus:
            raise ValueError(f"vCPU {vcpu.index}: the VM has vCPUs 0..{self.max_vcpus - 1}")
        if self.boot_info is not None:
            x86.configure_vcpu(vcpu, self.boot_info, self.supported_cpuid, self.max_vcpus, self.tsc_deadline)
            return
        assert self.flat is not None
        vcpu.set_cpuid2(vcpu_cpuid(self.supported_cpuid, vcpu.index, self.max_vcpus, self.tsc_deadline))
        self._reset_sregs[vcpu.index] = vcpu.get_sregs()
        flat_vcpu_state(vcpu, self.flat)

    def rearm(self, vcpu: VcpuFd) -> None:
        """Before a parked vCPU runs again: nothing for a kernel (its INIT-SIPI-SIPI resets the vCPU);
        a flat image's entry state again."""
        if self.flat is None:
            return
        reset = self._reset_sregs.get(vcpu.index)
        if reset is not None:
            vcpu.set_sregs(reset)
        flat_vcpu_state(vcpu, self.flat)
