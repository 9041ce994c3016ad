"""katapy.resource.cpu: Kata's vCPU sizing rule, and the order of a resize between hypervisor and agent.

The hypervisor and agent here are stand-ins recording the calls (the real ones are exercised end to end in
tests/cri/test_cri_resize.py and tests/hypervisor/test_qemu_backend.py); the stand-in hypervisor is a real
``SandboxVm`` subclass, so its range and state checks are the product's.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import trio

from katapy.agent_client.types import OnlineCpus
from katapy.hypervisor.base import VmConfig, VmState
from katapy.hypervisor.common import SandboxVm
from katapy.resource.cpu import CpuResource, ResizeError, VcpuPolicy, cpu_limit, vcpu_target
from katapy.shim import annotations as ann
from katapy.config import HypervisorConfig
from katapy.ttrpc.errors import FailedPrecondition

POLICY = VcpuPolicy(base=1, floor=1, max_vcpus=4)


def _cpu(quota: int | None, period: int | None = 100_000) -> dict:
    return {"cpu": {k: v for k, v in (("quota", quota), ("period", period)) if v is not None}}


# -- the rule -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resources,limit", [
    (_cpu(300_000), Fraction(3)), (_cpu(150_000), Fraction(3, 2)), (_cpu(-1), None), (_cpu(0), None),
    (_cpu(100_000, 0), None), (_cpu(None), None), ({}, None), (None, None), ({"memory": {"limit": 1}}, None),
])
def test_cpu_limit_from_oci_resources(resources, limit):
    assert cpu_limit(resources) == limit


@pytest.mark.parametrize("limits,vcpus,wanted,capped", [
    ([], 1, 1, False),
    ([Fraction(3)], 4, 4, False),
    ([Fraction(1, 2), Fraction(1, 2)], 2, 2, False),  # ceil of the sum, not the sum of ceils (1 + 1 + 1)
    ([Fraction(1, 3)] * 3, 2, 2, False),
    ([Fraction(5, 2), Fraction(1, 10)], 4, 4, False),
    ([Fraction(8)], 4, 9, True),
])
def test_target_is_base_plus_ceil_of_the_sum_capped(limits, vcpus, wanted, capped):
    t = vcpu_target(POLICY, limits)
    assert (t.vcpus, t.wanted, t.capped) == (vcpus, wanted, capped)


def test_boot_sizing_is_a_floor_and_not_counted_twice():
    """A pod booted with CRI sizing (quota 2 CPUs: 1 + 2 = 3 online) whose containers ask for those 2 CPUs
    stays at 3, not 5; it never shrinks below its boot size."""
    hv = HypervisorConfig(default_vcpus=1, max_vcpus=4)
    s = ann.sandbox_sizing({ann.CRI_CPU_QUOTA: "200000", ann.CRI_CPU_PERIOD: "100000"}, hv)
    assert (s.base_vcpus, s.vcpus) == (1, 3)
    policy = VcpuPolicy(base=s.base_vcpus, floor=s.vcpus, max_vcpus=hv.max_vcpus)
    assert vcpu_target(policy, [Fraction(1), Fraction(1)]).vcpus == 3
    assert vcpu_target(policy, []).vcpus == 3
    assert vcpu_target(policy, [Fraction(3)]).vcpus == 4


def test_sizing_annotation_base_is_the_katapy_default_vcpus():
    s = ann.sandbox_sizing({ann.VCPUS: "2"}, HypervisorConfig(default_vcpus=1, max_vcpus=4))
    assert (s.base_vcpus, s.vcpus) == (2, 2)


@pytest.mark.parametrize("base,floor,top", [(0, 1, 4), (2, 1, 4), (1, 5, 4)])
def test_policy_refuses_inconsistent_numbers(base, floor, top):
    with pytest.raises(ValueError, match="VcpuPolicy needs"):
        VcpuPolicy(base=base, floor=floor, max_vcpus=top)


def test_guest_cmdline_keeps_the_extra_vcpus_offline(tmp_path):
    cfg = VmConfig("s", tmp_path / "st", tmp_path / "k", tmp_path / "i", vcpus=1, max_vcpus=4)
    assert "maxcpus=1" in cfg.guest_cmdline().split()
    same = VmConfig("s", tmp_path / "st", tmp_path / "k", tmp_path / "i", vcpus=2, max_vcpus=2)
    assert "maxcpus" not in same.guest_cmdline()


# -- the orchestration -----------------------------------------------------------------------------------------

class RecordingVm(SandboxVm):
    """A started VM of a backend that creates every max_vcpus vCPU at start (as qemu and builtin)."""

    name = "recording"
    vmm_label = "the recording VMM"
    vcpus_present_at_boot = True

    def __init__(self, calls: list[str], max_vcpus: int = 4) -> None:
        super().__init__()
        self.calls = calls
        self.cfg = VmConfig("s", Path("/nonexistent"), Path("k"), Path("i"), vcpus=1, max_vcpus=max_vcpus)
        self._state = VmState.RUNNING

    async def resize_vcpus(self, n: int) -> int:
        self.calls.append(f"hv {n}")
        return await super().resize_vcpus(n)

    def state(self) -> VmState:
        return self._state

    async def start_vm(self, cfg): raise AssertionError  # noqa: E704
    async def stop_vm(self): raise AssertionError  # noqa: E704
    async def pause_vm(self): self._state = VmState.PAUSED  # noqa: E704
    async def resume_vm(self): self._state = VmState.RUNNING  # noqa: E704
    async def wait_exit(self): raise AssertionError  # noqa: E704
    async def cleanup(self): pass  # noqa: E704


class FakeAgent:
    """The agent's SetOnlineCPUs answer; ``refuse_below``: an offline under that count fails as the guest's would."""

    def __init__(self, calls: list[str], present: int = 4, refuse_below: int = 0) -> None:
        self.calls, self.present, self.refuse_below, self.online = calls, present, refuse_below, 1

    async def set_online_cpus(self, n: int, timeout: float | None = None) -> OnlineCpus:
        self.calls.append(f"agent {n}")
        if n < self.refuse_below:
            raise FailedPrecondition(f"setting {n} online CPUs (from {self.online}): cpu{n} refused to go offline: "
                                     f"Device or resource busy; {self.online} CPUs online now")
        self.online = n
        return OnlineCpus(n, self.present, tuple(range(n)))


def _run(fn):
    return trio.run(fn)


def test_grow_asks_the_hypervisor_then_the_agent_and_shrink_the_reverse():
    calls: list[str] = []
    hv, agent = RecordingVm(calls), FakeAgent(calls)
    cpu = CpuResource(POLICY, hv, agent)

    async def main():
        assert await cpu.set_container("a", _cpu(300_000)) == 4
        assert await cpu.set_container("a", _cpu(100_000)) == 2
        assert await cpu.set_container("b", _cpu(None)) == 2  # no quota: adds nothing, changes nothing
        assert await cpu.remove_container("a") == 1
        assert await cpu.remove_container("never-there") == 1

    _run(main)
    assert calls == ["hv 4", "agent 4", "agent 2", "hv 2", "agent 1", "hv 1"]
    assert hv.vcpus == 1 and cpu.limits == {}


def test_above_max_is_capped_and_logged(capsys):
    calls: list[str] = []
    cpu = CpuResource(POLICY, RecordingVm(calls), FakeAgent(calls))
    assert _run(lambda: cpu.set_container("big", _cpu(800_000))) == 4
    out = capsys.readouterr()
    text = out.out + out.err
    assert "vCPU target capped at max_vcpus" in text and "wanted=9" in text and "max_vcpus=4" in text, text


def test_paused_vm_is_a_clear_error_and_nothing_changes():
    calls: list[str] = []
    hv = RecordingVm(calls)
    cpu = CpuResource(POLICY, hv, FakeAgent(calls))

    async def main():
        await hv.pause_vm()
        with pytest.raises(ResizeError, match="cannot resize the sandbox VM from 1 to 4 vCPUs: the VM is paused"):
            await cpu.set_container("a", _cpu(300_000))

    _run(main)
    assert calls == [] and cpu.limits == {} and cpu.vcpus == 1 and hv.vcpus == 1


def test_refused_offline_is_a_clear_error_and_both_sides_stay():
    calls: list[str] = []
    hv, agent = RecordingVm(calls), FakeAgent(calls, refuse_below=4)
    cpu = CpuResource(POLICY, hv, agent)

    async def main():
        assert await cpu.set_container("a", _cpu(300_000)) == 4
        with pytest.raises(ResizeError, match="the guest could not set 1 online CPUs: .*cpu1 refused to go offline"):
            await cpu.remove_container("a")

    _run(main)
    assert calls == ["hv 4", "agent 4", "agent 1"]  # the hypervisor was not told to shrink
    assert cpu.vcpus == 4 and hv.vcpus == 4 and "a" in cpu.limits


def test_a_failed_online_puts_the_hypervisor_back():
    calls: list[str] = []

    class Refusing(FakeAgent):
        async def set_online_cpus(self, n, timeout=None):
            calls.append(f"agent {n}")
            raise FailedPrecondition("cpu2 refused to go online: Input/output error; 1 CPUs online now")

    hv = RecordingVm(calls)
    cpu = CpuResource(POLICY, hv, Refusing(calls))
    with pytest.raises(ResizeError, match="cpu2 refused to go online"):
        _run(lambda: cpu.set_container("a", _cpu(300_000)))
    assert calls == ["hv 4", "agent 4", "hv 1"] and hv.vcpus == 1 and cpu.vcpus == 1


def test_hypervisor_limits_are_checked_before_the_agent_acts():
    """A hypervisor with fewer vCPUs than the policy thinks (max 2): its range error, the agent untouched."""
    calls: list[str] = []
    cpu = CpuResource(POLICY, RecordingVm(calls, max_vcpus=2), FakeAgent(calls))
    with pytest.raises(ResizeError, match=r"resize_vcpus 4: out of range 1\.\.2 .*max_vcpus = 2"):
        _run(lambda: cpu.set_container("a", _cpu(300_000)))
    assert calls == ["hv 4"] and cpu.vcpus == 1
