"""The KVM system fd (/dev/kvm): API version, capabilities, supported CPUID, VM creation.

Documentation/virt/kvm/api.rst, section 4: KVM_GET_API_VERSION (4.1),
KVM_CREATE_VM (4.2), KVM_CHECK_EXTENSION (4.4), KVM_GET_VCPU_MMAP_SIZE (4.5),
KVM_GET_SUPPORTED_CPUID (4.46), KVM_GET_MSR_INDEX_LIST (4.3).
"""
from __future__ import annotations

import os

from katapy.vmm.kvm._ffi import KvmError, check, ffi, lib
from katapy.vmm.kvm.cpuid import MAX_CPUID_ENTRIES, CpuidEntry, cpuid_from_c

KVM_API_VERSION = 12


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = self.api_version()
            if version != KVM_API_VERSION:
                raise KvmError(0, f"KVM API version {version}, katapy needs {KVM_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def api_version(self) -> int:
        return check(lib.katapy_ioctl(self.fd, lib.KVM_GET_API_VERSION, 0), "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """0 when absent, otherwise a capability-specific positive value."""
        r = lib.katapy_ioctl(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return r if r > 0 else 0

    def vcpu_mmap_size(self) -> int:
        return check(lib.katapy_ioctl(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE")

    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(lib.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[CpuidEntry]:
        c = ffi.new("struct kvm_cpuid2 *", {"nent": MAX_CPUID_ENTRIES, "entries": MAX_CPUID_ENTRIES})
        c.nent = MAX_CPUID_ENTRIES
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, c), "KVM_GET_SUPPORTED_CPUID")
        return cpuid_from_c(c)

    def msr_index_list(self) -> list[int]:
        n = 1024
        c = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        c.nmsrs = n
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, c), "KVM_GET_MSR_INDEX_LIST")
        return [c.indices[i] for i in range(c.nmsrs)]

    def create_vm(self) -> "VmFd":
        from katapy.vmm.kvm.vm import VmFd

        fd = check(lib.katapy_ioctl(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        os.set_inheritable(fd, False)
        return VmFd(fd, self)
