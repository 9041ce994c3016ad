"""Thin typed wrappers over the KVM file descriptors (rust-vmm kvm-ioctls, in Python).

``system`` (/dev/kvm), ``vm`` (the VM fd), ``vcpu`` (a vCPU fd and its
kvm_run page), ``cpuid`` (CPUID entries, shared by ``system`` and ``vcpu``),
``exits`` (typed KVM_RUN results), ``host`` (which kind of KVM this is).
cffi stays inside this package.
"""
from katapy.vmm.kvm.host import KvmFlavor, hardware_kvm, kvm_flavor

__all__ = ["KvmFlavor", "hardware_kvm", "kvm_flavor"]
