"""Vmm.resize_vcpus on real KVM with a flat guest (kvm-pvm is enough): vCPUs created while the VM runs,
their threads started and stopped, parked fds reused, refusals undone, a paused VM refused.

A flat image has no upcall server, so the guest's half is a scripted DeviceManagerClient put where
``Vmm._device_manager`` keeps the real one; everything else is the product's path (KVM_CREATE_VCPU,
the builder's per-vCPU setup, VcpuThread).  Each vCPU prints ``'A' + its APIC id`` (CPUID leaf 1)
and the logical-processor count CPUID gives it, then halts in the in-kernel LAPIC.
"""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from katapy.upcall import wire
from katapy.vmm.state import VmState
from katapy.vmm.upcall import UpcallRefused, UpcallTimeout
from tests.vmm.conftest import SerialCapture
from tests.vmm.guestasm import protected_mode_guest

GUEST = r"""
    mov $1, %eax
    cpuid
    mov %ebx, %ecx
    shr $24, %ebx
    lea 0x41(%ebx), %eax
    mov $0x3f8, %dx
    out %al, %dx
    shr $16, %ecx
    and $0xff, %ecx
    lea 0x30(%ecx), %eax
    out %al, %dx
    cli
1:  hlt
    jmp 1b
"""


def _vcpu_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("katapy-vcpu") and t.is_alive()}


class ScriptedGuest:
    """The two CPU requests, checked against the VMM's threads at the moment they are sent."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.fail: Exception | None = None

    def add_cpus(self, ids, **_kw) -> None:
        missing = {f"katapy-vcpu{i}" for i in ids} - _vcpu_threads()
        assert not missing, f"ADD_CPU sent before {missing} ran"
        self.log.append(f"ADD_CPU {list(ids)}")
        if self.fail:
            raise self.fail

    def del_cpus(self, ids, **_kw) -> None:
        missing = {f"katapy-vcpu{i}" for i in ids} - _vcpu_threads()
        assert not missing, f"DEL_CPU sent after {missing} stopped"
        self.log.append(f"DEL_CPU {list(ids)}")
        if self.fail:
            raise self.fail

    def close(self) -> None:
        self.log.append("close")


def _wait_threads(want: set[str], timeout: float = 5.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while _vcpu_threads() != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return _vcpu_threads()


def test_vcpus_are_created_started_parked_and_reused_at_run_time(vmm):
    from katapy.vmm.api import VmmError

    assert _vcpu_threads() == set()
    fds = len(os.listdir("/proc/self/fd"))
    out = SerialCapture()
    vmm.configure_machine(1, 16, max_vcpus=3)
    vmm.set_flat_boot(protected_mode_guest(GUEST))
    vmm.add_serial_output(out)
    guest = ScriptedGuest()
    vmm._upcall = guest  # where _device_manager keeps the guest's device-manager client
    vmm.start()
    assert out.wait_for(b"A3")  # vCPU 0 of 3 possible CPUs (CPUID describes max_vcpus)
    assert len(vmm.built.vcpus) == 1 and _vcpu_threads() == {"katapy-vcpu0"} and vmm.vcpu_count() == 1

    assert vmm.resize_vcpus(3) == 3
    assert out.wait_for(b"B3") and out.wait_for(b"C3")
    assert guest.log == ["ADD_CPU [1, 2]"] and vmm.vcpu_count() == 3
    assert _vcpu_threads() == {"katapy-vcpu0", "katapy-vcpu1", "katapy-vcpu2"}
    first_fds = list(vmm.built.vcpus)

    assert vmm.resize_vcpus(1) == 1
    assert guest.log[-1] == "DEL_CPU [1, 2]"
    assert _vcpu_threads() == {"katapy-vcpu0"}  # joined before resize_vcpus returned
    assert vmm.built.vcpus == first_fds  # parked: KVM cannot destroy a vCPU, the fds stay

    before = bytes(out.data).count(b"B")
    assert vmm.resize_vcpus(2) == 2
    assert vmm.built.vcpus == first_fds  # vCPU 1 reused, not created again
    deadline = time.monotonic() + 5
    while bytes(out.data).count(b"B") == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bytes(out.data).count(b"B") == before + 1  # the reused vCPU ran from the entry again
    assert _vcpu_threads() == {"katapy-vcpu0", "katapy-vcpu1"}

    # a refusal undoes: vCPU 2's new thread stops again, its fd stays parked
    guest.fail = UpcallRefused(wire.Request(wire.MsgType.ADD_CPU, wire.CpuRequest((2,))), errno.EIO, 0)
    with pytest.raises(VmmError, match=r"refused or never got ADD_CPU \[2\].*keeps 2 vCPUs"):
        vmm.resize_vcpus(3)
    assert vmm.vcpu_count() == 2 and _wait_threads({"katapy-vcpu0", "katapy-vcpu1"}) == {
        "katapy-vcpu0", "katapy-vcpu1"}
    # a refused shrink keeps them
    guest.fail = UpcallRefused(wire.Request(wire.MsgType.DEL_CPU, wire.CpuRequest((1,))), errno.EBUSY, 0)
    with pytest.raises(VmmError, match=r"removing vCPUs \[1\].*they stay"):
        vmm.resize_vcpus(1)
    assert vmm.vcpu_count() == 2 and "katapy-vcpu1" in _vcpu_threads()
    # no answer: in doubt, the new vCPU stays
    guest.fail = UpcallTimeout("no answer", sent=True)
    with pytest.raises(VmmError, match=r"no answer from the guest.*the VM has 3 vCPUs"):
        vmm.resize_vcpus(3)
    assert vmm.vcpu_count() == 3 and len(_vcpu_threads()) == 3
    guest.fail = None

    for bad in (0, 4):
        with pytest.raises(VmmError, match=r"outside 1\.\.3 \(max_vcpus\)"):
            vmm.resize_vcpus(bad)
    vmm.pause()  # pauses the hot-added threads too
    assert all(t.paused for t in vmm._vcpus) and len(vmm._vcpus) == 3
    with pytest.raises(VmmError, match="cannot resize the vCPUs of a VM that is paused"):
        vmm.resize_vcpus(1)
    vmm.resume()
    assert vmm.state() is VmState.RUNNING and vmm.vcpu_count() == 3
    n_log = len(guest.log)
    assert vmm.resize_vcpus(3) == 3 and len(guest.log) == n_log  # same count: nothing sent

    vmm.stop()
    assert _vcpu_threads() == set()
    assert len(os.listdir("/proc/self/fd")) == fds
    with pytest.raises(VmmError, match="stopped"):
        vmm.resize_vcpus(2)


def test_hotplug_without_an_upcall_socket_is_a_clear_error_and_changes_nothing(vmm):
    from katapy.vmm.api import VmmError

    vmm.configure_machine(1, 16, max_vcpus=2)
    vmm.set_flat_boot(protected_mode_guest(GUEST))
    vmm.start()
    with pytest.raises(VmmError, match="vCPU hotplug needs the upcall channel"):
        vmm.resize_vcpus(2)
    assert vmm.vcpu_count() == 1 and len(vmm.built.vcpus) == 1


def test_an_unreachable_guest_counts_as_a_refusal(vmm, tmp_path):
    """The real client: no hybrid-vsock socket to dial, so ADD_CPU never leaves; the new vCPU is parked."""
    from katapy.vmm.api import VmmError

    vmm.upcall_connect_timeout_s = 0.5
    vmm.configure_machine(1, 16, max_vcpus=2)
    vmm.set_flat_boot(protected_mode_guest(GUEST))
    vmm.set_upcall_socket(tmp_path / "no-such.sock")
    vmm.start()
    with pytest.raises(VmmError, match=r"refused or never got ADD_CPU \[1\]"):
        vmm.resize_vcpus(2)
    assert vmm.vcpu_count() == 1 and len(vmm.built.vcpus) == 2
    assert _wait_threads({"katapy-vcpu0"}) == {"katapy-vcpu0"}
