"""The whole VMM (Vmm API, builder, vCPU threads, buses, legacy devices) with tiny guests on real KVM."""
from __future__ import annotations

import time

import pytest

from katapy.vmm.state import ExitReason, VmState
from tests.vmm.conftest import SerialCapture
from tests.vmm.guestasm import assemble, protected_mode_guest


def test_serial_output_and_i8042_reset_end_the_vm(vmm):
    out = SerialCapture()
    vmm.configure_machine(1, 16)
    vmm.set_flat_boot(assemble(r"""
.code16
    mov $0x3f8, %dx
    mov $msg, %si
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0xfe, %al
    out %al, $0x64
    hlt
msg: .asciz "hello from the guest\n"
"""))
    vmm.add_serial_output(out)
    vmm.start()
    assert vmm.state() is VmState.RUNNING
    ex = vmm.wait(10)
    assert ex is not None and ex.reason is ExitReason.RESET
    assert bytes(out.data) == b"hello from the guest\n"
    vmm.stop()
    assert vmm.state() is VmState.STOPPED
    vmm.stop()  # idempotent


def test_serial_input_reaches_the_guest(vmm):
    out = SerialCapture()
    vmm.configure_machine(1, 16)
    vmm.set_flat_boot(assemble(r"""
.code16
    mov $0x3f8, %dx
    mov $'?', %al
    out %al, %dx
    mov $0x3fd, %dx      /* LSR */
1:  in %dx, %al
    test $1, %al         /* data ready */
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    add $1, %al
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
"""))
    vmm.add_serial_output(out)
    vmm.start()
    assert out.wait_for(b"?")
    assert vmm.serial_input(b"a") == 1
    assert vmm.wait(10).reason is ExitReason.RESET
    assert bytes(out.data) == b"?b"


def test_protected_mode_guest(vmm):
    out = SerialCapture()
    vmm.configure_machine(1, 16)
    vmm.set_flat_boot(protected_mode_guest(r"""
    mov $0x50524f54, %eax     /* "TORP" little-endian */
    call emit_eax
    jmp reset
"""))
    vmm.add_serial_output(out)
    vmm.start()
    ex = vmm.wait(10)
    assert ex.reason is ExitReason.RESET, ex
    assert bytes(out.data) == b"TORP"


@pytest.mark.kvm
def test_triple_fault_ends_the_vm(vmm):
    """kvm-pvm cannot deliver an exception through a broken IDT (it reports an emulation
    failure at the int instruction), so this needs hardware KVM."""
    vmm.configure_machine(1, 16)
    vmm.set_flat_boot(protected_mode_guest(r"""
    mov $0x42, %al
    out %al, $0x80            /* a device access the report must name */
    lidt bad_idt
    int $3                    /* no IDT: #GP -> #DF -> triple fault */
bad_idt: .word 0
    .long 0
"""))
    vmm.start()
    ex = vmm.wait(10)
    assert ex.reason is ExitReason.TRIPLE_FAULT, ex
    assert "last device accesses: out 0x80" in ex.detail, ex.detail


@pytest.mark.parametrize("vcpus", [2, 4])
def test_several_vcpus_run_in_parallel(vmm, vcpus):
    out = SerialCapture()
    vmm.configure_machine(vcpus, 32)
    # Every vCPU reads its APIC id from CPUID leaf 1 (set per vCPU by the VMM), prints
    # 'A' + id, and counts itself in; vCPU 0 waits for all, then resets the machine.
    vmm.set_flat_boot(protected_mode_guest(rf"""
    mov $1, %eax
    cpuid
    shr $24, %ebx
    lea 0x41(%ebx), %eax
    mov $0x3f8, %dx
    out %al, %dx
    lock incl counter
    test %ebx, %ebx
    jnz 2f
1:  cmpl ${vcpus}, counter
    jne 1b
    jmp reset
2:  cli
    hlt
    jmp 2b
.align 4
counter: .long 0
"""))
    vmm.add_serial_output(out)
    vmm.start()
    ex = vmm.wait(20)
    assert ex is not None and ex.reason is ExitReason.RESET, ex
    assert sorted(out.data) == [0x41 + i for i in range(vcpus)]


def test_pause_resume_and_stop_of_a_busy_guest(vmm):
    vmm.configure_machine(1, 16)
    vmm.set_flat_boot(assemble(r"""
.code16
1:  incl 0x8000
    jmp 1b
"""))
    vmm.start()
    mem = vmm.built.mem
    deadline = time.monotonic() + 5
    while mem.read_u32(0x8000) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mem.read_u32(0x8000) > 0
    vmm.pause()
    assert vmm.state() is VmState.PAUSED
    frozen = mem.read_u32(0x8000)
    time.sleep(0.2)
    assert mem.read_u32(0x8000) == frozen
    vmm.resume()
    time.sleep(0.1)
    assert mem.read_u32(0x8000) != frozen
    t0 = time.monotonic()
    vmm.stop()
    assert time.monotonic() - t0 < 5
    assert vmm.wait(0).reason is ExitReason.STOPPED


def test_stop_interrupts_a_vcpu_halted_in_the_kernel(vmm):
    """With the in-kernel LAPIC, HLT does not exit: only the kick signal gets the thread out of KVM_RUN."""
    out = SerialCapture()
    vmm.configure_machine(2, 16)
    vmm.set_flat_boot(assemble(r"""
.code16
    mov $0x3f8, %dx
    mov $'h', %al
    out %al, %dx
    cli
1:  hlt
    jmp 1b
"""))
    vmm.add_serial_output(out)
    vmm.start()
    assert out.wait_for(b"hh")
    assert vmm.wait(0.3) is None  # still halted, not ended
    vmm.pause()
    vmm.resume()
    t0 = time.monotonic()
    vmm.stop()
    assert time.monotonic() - t0 < 5
    assert all(not t.alive for t in vmm._vcpus)


def test_configuration_errors_are_clear(vmm, tmp_path):
    from katapy.vmm.api import VmmError
    from katapy.vmm.config import ConfigError

    with pytest.raises(ConfigError):
        vmm.configure_machine(0, 16)
    with pytest.raises(ConfigError):
        vmm.set_boot_source(tmp_path / "missing", None, "")
    with pytest.raises(ConfigError):
        vmm.start()  # no boot source
    vmm.set_flat_boot(b"\xf4")
    with pytest.raises(VmmError):
        vmm.resume()


def test_nothing_leaks_across_vm_lifetimes(kvm_required):
    import os
    import threading

    from katapy.vmm.api import Vmm
    from tests.vmm.recording_device import RecordingDevice

    def one_vm():
        v = Vmm()
        v.configure_machine(2, 16)
        v.add_device(RecordingDevice())
        v.set_flat_boot(assemble(".code16\n mov $0xfe, %al\n out %al, $0x64\n"))
        v.start()
        assert v.wait(10).reason is ExitReason.RESET
        v.stop()

    one_vm()  # first use installs the kick handler and imports everything
    fds, threads = len(os.listdir("/proc/self/fd")), set(threading.enumerate())
    for _ in range(5):
        one_vm()
    assert len(os.listdir("/proc/self/fd")) == fds
    # threads started by these VMs that outlived them (a thread of an earlier test may end meanwhile)
    assert [t.name for t in threading.enumerate() if t not in threads] == []
