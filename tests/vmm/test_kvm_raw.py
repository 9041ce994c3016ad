"""The KVM wrappers on this host's /dev/kvm with tiny real-mode guests (no VMM around them)."""
from __future__ import annotations

import os

import pytest

from katapy.vmm.kvm import exits
from katapy.vmm.memory import GuestMemory
from tests.vmm.guestasm import assemble

pytestmark = pytest.mark.usefixtures("kvm_required")


@pytest.fixture
def raw_vm():
    from katapy.vmm.kvm.system import Kvm

    kvm = Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory.create([(0, 0x10000)])
    vm.register_memory(mem)
    vm.set_tss_addr()
    vcpus = []

    def make(code: bytes, irqchip: bool = False):
        if irqchip:
            vm.create_irqchip()
        mem.write(0x1000, code)
        v = vm.create_vcpu(len(vcpus))
        vcpus.append(v)
        s = v.get_sregs()
        for seg in (s.cs, s.ds, s.es, s.ss):
            seg.base, seg.selector = 0, 0
        v.set_sregs(s)
        r = v.get_regs()
        r.rip, r.rsp, r.rflags = 0x1000, 0x8000, 2
        v.set_regs(r)
        return v

    yield make, vm, mem
    for v in vcpus:
        v.close()
    vm.close()
    mem.close()
    kvm.close()


def run_until(v, predicate, limit=50):
    seen = []
    for _ in range(limit):
        e = v.run()
        seen.append(e)
        if predicate(e):
            return seen
    raise AssertionError(f"guest did not reach the expected exit: {seen}")


def test_api_version_and_capabilities():
    from katapy.vmm.kvm import consts
    from katapy.vmm.kvm.system import Kvm

    with Kvm() as kvm:
        assert kvm.api_version() == 12
        assert kvm.vcpu_mmap_size() >= 4096
        assert kvm.check_extension(consts.KVM_CAP_IRQCHIP)
        assert kvm.check_extension(consts.KVM_CAP_IOEVENTFD)
        cpuid = kvm.supported_cpuid()
        assert any(e.function == 0 for e in cpuid) and any(e.function == 1 for e in cpuid)
        assert kvm.msr_index_list()


def test_port_io_both_ways(raw_vm):
    make, _, _ = raw_vm
    v = make(assemble(r"""
.code16
    mov $0x3f8, %dx
    mov $0x41, %al
    out %al, %dx          /* IoOut 'A' */
    in %dx, %al           /* IoIn: the host answers */
    add $1, %al
    out %al, %dx          /* echo answer + 1 */
    mov $0x1234, %ax
    mov $0x500, %dx
    out %ax, %dx          /* 16-bit out */
    in %dx, %eax          /* 32-bit in */
    out %eax, %dx
    hlt
"""))
    e = v.run()
    assert e == exits.IoOut(0x3F8, 1, b"A")
    e = v.run()
    assert e == exits.IoIn(0x3F8, 1)
    v.complete_io_in(b"\x10")
    assert v.run() == exits.IoOut(0x3F8, 1, b"\x11")
    assert v.run() == exits.IoOut(0x500, 2, b"\x34\x12")
    assert v.run() == exits.IoIn(0x500, 4)
    v.complete_io_in(b"\xde\xad\xbe\xef")
    assert v.run() == exits.IoOut(0x500, 4, b"\xde\xad\xbe\xef")
    assert v.run() == exits.Hlt()


def test_mmio_both_ways(raw_vm):
    make, _, mem = raw_vm
    # RAM is 64 KiB; 0xf0000 is unbacked, so accesses there are MMIO exits.
    v = make(assemble(r"""
.code16
    mov $0xf000, %ax
    mov %ax, %es
    movl $0xcafef00d, %es:0x10    /* MmioWrite 4 bytes at 0xf0010 */
    movw %es:0x20, %ax            /* MmioRead 2 bytes at 0xf0020 */
    movw %ax, 0x8000              /* to RAM, for the host to check */
    movb %es:0x30, %bl
    movb %bl, 0x8002
    hlt
"""))
    assert v.run() == exits.MmioWrite(0xF0010, b"\x0d\xf0\xfe\xca")
    assert v.run() == exits.MmioRead(0xF0020, 2)
    v.complete_mmio_read(b"\x99\x88")
    assert v.run() == exits.MmioRead(0xF0030, 1)
    v.complete_mmio_read(b"\x77")
    assert v.run() == exits.Hlt()
    assert mem.read(0x8000, 3) == b"\x99\x88\x77"


def test_registers_round_trip(raw_vm):
    make, _, _ = raw_vm
    v = make(assemble(".code16\n hlt"))
    r = v.get_regs()
    r.rax, r.r15 = 0x1122334455667788, 42
    v.set_regs(r)
    back = v.get_regs()
    assert (back.rax, back.r15, back.rip) == (0x1122334455667788, 42, 0x1000)
    s = v.get_sregs()
    s.gdt.base, s.gdt.limit = 0x500, 39
    v.set_sregs(s)
    assert (v.get_sregs().gdt.base, v.get_sregs().gdt.limit) == (0x500, 39)
    from katapy.vmm.boot.msrs import MSR_IA32_SYSENTER_CS

    assert v.set_msrs({MSR_IA32_SYSENTER_CS: 0x10}) == 1
    assert v.get_msrs([MSR_IA32_SYSENTER_CS]) == {MSR_IA32_SYSENTER_CS: 0x10}


def test_ioeventfd_absorbs_the_write_and_irqchip_lapic(raw_vm):
    """A guest write matching an ioeventfd signals it inside KVM: the vCPU never exits for it."""
    make, vm, _ = raw_vm
    v = make(assemble(r"""
.code16
    mov $0xf000, %ax
    mov %ax, %es
    movl $1, %es:0x50     /* datamatch 1: absorbed */
    movl $7, %es:0x50     /* no match: an MMIO exit */
    mov $0x3f8, %dx
    out %al, %dx
"""), irqchip=True)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        vm.register_ioeventfd(fd, 0xF0050, 4, datamatch=1)
        assert v.run() == exits.MmioWrite(0xF0050, b"\x07\0\0\0")
        assert os.eventfd_read(fd) == 1
        assert isinstance(v.run(), exits.IoOut)
        assert len(v.get_lapic()) == 1024
        vm.unregister_ioeventfd(fd, 0xF0050, 4, datamatch=1)
    finally:
        os.close(fd)


def test_kvm_flavor_classifies_fake_trees(tmp_path):
    from katapy.vmm.kvm.host import kvm_flavor

    dev = tmp_path / "kvm"
    mods = tmp_path / "module"
    mods.mkdir()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu vme hypervisor\n")
    assert kvm_flavor(dev, mods, cpuinfo) == "absent"
    dev.write_text("")
    (mods / "kvm_pvm").mkdir()
    assert kvm_flavor(dev, mods, cpuinfo) == "kvm-pvm"
    (mods / "kvm_pvm").rmdir()
    (mods / "kvm_amd").mkdir()
    cpuinfo.write_text("flags\t: fpu svm\n")
    assert kvm_flavor(dev, mods, cpuinfo) == "hardware-svm"
    cpuinfo.write_text("flags\t: fpu vmx\n")
    (mods / "kvm_amd").rmdir()
    (mods / "kvm_intel").mkdir()
    assert kvm_flavor(dev, mods, cpuinfo) == "hardware-vmx"
