"""katapy.vmm.vcpu_hotplug's ordering contract with recording vCPU ops and a scripted guest (no /dev/kvm).

What it checks: a vCPU exists and runs before the guest is told ADD_CPU; a refusal (or a request that
never left) stops the new threads and keeps the fds parked; an unanswered ADD_CPU keeps them (the
guest may have onlined them); DEL_CPU comes before a thread stops, and a refused or unanswered DEL_CPU
keeps them; a parked vCPU is reused, never created twice; CPU 0 never goes; bad counts change nothing.
The same path on real KVM with a flat guest: tests/vmm/test_vcpu_hotplug_flat.py.
"""
from __future__ import annotations

import errno

import pytest

from katapy.upcall import wire
from katapy.vmm.upcall import UpcallBusy, UpcallConnectionLost, UpcallRefused, UpcallTimeout
from katapy.vmm.vcpu_hotplug import VcpuHotplug, VcpuHotplugError, VcpuOps


class RecordingVmm:
    """KVM's vCPUs (created once, never destroyed) and their threads, with a log of every step."""

    def __init__(self, boot: int) -> None:
        self.created = set(range(boot))
        self.running = set(range(boot))
        self.log: list[str] = []
        self.fail_create: int | None = None
        self.stuck: set[int] = set()

    def create(self, i: int) -> None:
        assert i not in self.created, f"vCPU {i} created twice (KVM would answer EEXIST)"
        if i == self.fail_create:
            raise OSError(errno.EINVAL, "KVM_CREATE_VCPU failed")
        self.created.add(i)
        self.log.append(f"create {i}")

    def start(self, i: int) -> None:
        assert i in self.created and i not in self.running
        self.running.add(i)
        self.log.append(f"start {i}")

    def stop(self, i: int) -> None:
        assert i in self.running
        if i in self.stuck:
            raise RuntimeError(f"vCPU {i}'s thread did not stop")
        self.running.discard(i)
        self.log.append(f"stop {i}")

    def ops(self) -> VcpuOps:
        return VcpuOps(self.create, self.start, self.stop)


class ScriptedGuest:
    def __init__(self, vmm: RecordingVmm) -> None:
        self.vmm = vmm
        self.fail: Exception | None = None

    def add_cpus(self, ids: list[int]) -> None:
        assert set(ids) <= self.vmm.running, "told before the vCPUs run"
        self.vmm.log.append(f"ADD_CPU {ids}")
        if self.fail:
            raise self.fail

    def del_cpus(self, ids: list[int]) -> None:
        assert set(ids) <= self.vmm.running, "a vCPU stopped before the guest offlined it"
        assert 0 not in ids
        self.vmm.log.append(f"DEL_CPU {ids}")
        if self.fail:
            raise self.fail


def _parts(boot: int = 1, top: int = 4):
    vmm = RecordingVmm(boot)
    guest = ScriptedGuest(vmm)
    return VcpuHotplug(boot, top, vmm.ops(), guest), vmm, guest


def _request(kind: wire.MsgType, ids: list[int]) -> wire.Request:
    return wire.Request(kind, wire.CpuRequest(tuple(ids)))


def test_grow_shrink_and_regrow_reuse_parked_vcpus():
    hp, vmm, _ = _parts()
    assert hp.resize(3) == 3
    assert vmm.log == ["create 1", "start 1", "create 2", "start 2", "ADD_CPU [1, 2]"]
    vmm.log.clear()
    assert hp.resize(1) == 1
    assert vmm.log == ["DEL_CPU [1, 2]", "stop 2", "stop 1"]
    assert hp.parked == [1, 2] and vmm.running == {0}
    vmm.log.clear()
    assert hp.resize(4) == 4  # 1 and 2 reused (no create), 3 new
    assert vmm.log == ["start 1", "start 2", "create 3", "start 3", "ADD_CPU [1, 2, 3]"]
    assert hp.parked == [] and vmm.running == {0, 1, 2, 3}


def test_same_count_is_a_no_op():
    hp, vmm, _ = _parts(boot=2)
    assert hp.resize(2) == 2 and vmm.log == []


@pytest.mark.parametrize("exc", [
    UpcallRefused(_request(wire.MsgType.ADD_CPU, [1, 2]), errno.EIO, 1),
    UpcallBusy("busy", sent=False),
    ValueError("bad ids"),
])
def test_refused_add_stops_the_new_threads_and_parks_them(exc):
    hp, vmm, guest = _parts()
    guest.fail = exc
    with pytest.raises(VcpuHotplugError, match=r"refused or never got ADD_CPU \[1, 2\].*keeps 1 vCPUs"):
        hp.resize(3)
    assert vmm.log[-3:] == ["ADD_CPU [1, 2]", "stop 2", "stop 1"]
    assert hp.count == 1 and vmm.running == {0} and hp.parked == [1, 2]
    guest.fail = None
    vmm.log.clear()
    assert hp.resize(2) == 2 and vmm.log == ["start 1", "ADD_CPU [1]"]


@pytest.mark.parametrize("exc", [UpcallTimeout("no answer", sent=True), UpcallConnectionLost("eof", sent=True)])
def test_unanswered_add_keeps_the_vcpus(exc):
    hp, vmm, guest = _parts()
    guest.fail = exc
    with pytest.raises(VcpuHotplugError, match=r"no answer from the guest.*they stay, the VM has 3 vCPUs"):
        hp.resize(3)
    assert hp.count == 3 and vmm.running == {0, 1, 2} and vmm.log[-1] == "ADD_CPU [1, 2]"


def test_a_vcpu_that_cannot_be_created_undoes_the_grow_before_the_guest_hears_of_it():
    hp, vmm, _ = _parts()
    vmm.fail_create = 3
    with pytest.raises(VcpuHotplugError, match=r"adding vCPUs \[1, 2, 3\]: .*KVM_CREATE_VCPU failed.*keeps 1"):
        hp.resize(4)
    assert not any(e.startswith("ADD_CPU") for e in vmm.log)
    assert vmm.log[-2:] == ["stop 2", "stop 1"] and vmm.running == {0} and hp.count == 1
    vmm.fail_create = None
    assert hp.resize(4) == 4 and vmm.running == {0, 1, 2, 3}


@pytest.mark.parametrize("exc", [
    UpcallRefused(_request(wire.MsgType.DEL_CPU, [1]), errno.EBUSY, 0),
    UpcallTimeout("no answer", sent=True),
])
def test_refused_or_unanswered_del_keeps_the_vcpus(exc):
    hp, vmm, guest = _parts(boot=2)
    guest.fail = exc
    with pytest.raises(VcpuHotplugError, match=r"removing vCPUs \[1\]: .*they stay, the VM keeps 2 vCPUs"):
        hp.resize(1)
    assert hp.count == 2 and vmm.running == {0, 1} and vmm.log == ["DEL_CPU [1]"]


def test_a_thread_that_will_not_stop_is_reported():
    hp, vmm, _ = _parts(boot=3)
    vmm.stuck = {2}
    with pytest.raises(VcpuHotplugError, match=r"offlined vCPUs \[1, 2\], but the threads of \[2\] did not stop"):
        hp.resize(1)
    assert hp.count == 1 and vmm.running == {0, 2}


@pytest.mark.parametrize("n", [0, -1, 5])
def test_counts_outside_one_to_max_change_nothing(n):
    hp, vmm, _ = _parts(boot=2)
    with pytest.raises(VcpuHotplugError, match=r"outside 1\.\.4 \(max_vcpus\)"):
        hp.resize(n)
    assert hp.count == 2 and vmm.log == []


def test_inconsistent_limits_are_refused():
    vmm = RecordingVmm(1)
    with pytest.raises(VcpuHotplugError, match="needs 1 <= boot vCPUs"):
        VcpuHotplug(3, 2, vmm.ops(), ScriptedGuest(vmm))


def test_machine_config_max_vcpus_defaults_to_vcpus_and_is_checked():
    from katapy.vmm.config import MAX_VCPUS, ConfigError, MachineConfig

    assert MachineConfig(vcpus=3).max_vcpus == 3
    MachineConfig(vcpus=1, max_vcpus=MAX_VCPUS).validate()
    for bad in (1, MAX_VCPUS + 1):
        with pytest.raises(ConfigError, match=rf"max_vcpus={bad}: must be vcpus \(2\)\.\.{MAX_VCPUS}"):
            MachineConfig(vcpus=2, max_vcpus=bad).validate()
