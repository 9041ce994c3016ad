"""katapy.resource.cpu against a hypervisor with real vCPU hotplug (as the builtin VMM's resize_vcpus).

Such a hypervisor's grow already onlines the CPUs in the guest (upcall ADD_CPU) and may fail *after*
changing something (no answer: the vCPUs stay); its shrink runs after the agent offlined.  The
resource puts the other half back when the hypervisor's half fails, so both sides agree again.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import trio

from katapy.agent_client.types import OnlineCpus
from katapy.hypervisor.base import HypervisorError, VmConfig, VmState
from katapy.hypervisor.common import SandboxVm
from katapy.resource.cpu import CpuResource, ResizeError, VcpuPolicy


class HotplugVm(SandboxVm):
    """resize_vcpus as BuiltinHypervisor's: ADD_CPU onlines in the guest; ``keep_on_fail``: an unanswered
    request that leaves the new count in place; ``fail``: counts whose resize fails."""

    name = "hotplug"
    vmm_label = "the hotplug VMM"

    def __init__(self, calls: list[str], guest: "Guest") -> None:
        super().__init__()
        self.calls, self.guest = calls, guest
        self.cfg = VmConfig("s", Path("/nonexistent"), Path("k"), Path("i"), vcpus=1, max_vcpus=4)
        self._state = VmState.RUNNING
        self.fail: set[int] = set()
        self.keep_on_fail = False

    async def resize_vcpus(self, n: int) -> int:
        self.calls.append(f"hv {n}")
        if n in self.fail:
            old = self.vcpus
            if self.keep_on_fail:
                self._vcpus = n
                self.guest.online = max(self.guest.online, n)  # the guest did online them
            raise HypervisorError(f"resize_vcpus {old} -> {n}: no answer (the VM has {self.vcpus} vCPUs)")
        if n > self.vcpus:
            self.guest.online = n  # ADD_CPU onlined them
        self._vcpus = n
        return n

    def state(self) -> VmState:
        return self._state

    async def start_vm(self, cfg): raise AssertionError  # noqa: E704
    async def stop_vm(self): raise AssertionError  # noqa: E704
    async def pause_vm(self): raise AssertionError  # noqa: E704
    async def resume_vm(self): raise AssertionError  # noqa: E704
    async def wait_exit(self): raise AssertionError  # noqa: E704
    async def cleanup(self): pass  # noqa: E704


class Guest:
    def __init__(self, calls: list[str]) -> None:
        self.calls, self.online = calls, 1

    async def set_online_cpus(self, n: int, timeout: float | None = None) -> OnlineCpus:
        self.calls.append(f"agent {n} (had {self.online})")
        self.online = n
        return OnlineCpus(n, 4, tuple(range(n)))


def _parts():
    calls: list[str] = []
    guest = Guest(calls)
    hv = HotplugVm(calls, guest)
    return CpuResource(VcpuPolicy(base=1, floor=1, max_vcpus=4), hv, guest), hv, guest, calls


LIMIT = {"cpu": {"quota": 200_000, "period": 100_000}}


def test_grow_onlines_through_the_hypervisor_and_the_agent_finds_them_online():
    cpu, hv, guest, calls = _parts()
    assert trio.run(cpu.set_container, "a", LIMIT) == 3
    assert calls == ["hv 3", "agent 3 (had 3)"]  # the agent's call changes nothing
    assert trio.run(cpu.remove_container, "a") == 1
    assert calls[2:] == ["agent 1 (had 3)", "hv 1"] and hv.vcpus == 1 and guest.online == 1


def test_an_unanswered_grow_that_kept_the_vcpus_is_taken_back():
    cpu, hv, guest, calls = _parts()
    hv.fail, hv.keep_on_fail = {3}, True
    with pytest.raises(ResizeError, match="from 1 to 3 vCPUs: resize_vcpus 1 -> 3: no answer"):
        trio.run(cpu.set_container, "a", LIMIT)
    assert calls == ["hv 3", "hv 1"]  # the hypervisor was asked back to 1 (DEL_CPU offlines them)
    assert hv.vcpus == 1 and cpu.vcpus == 1 and cpu.limits == {}


def test_a_refused_grow_that_changed_nothing_is_not_undone():
    cpu, hv, guest, calls = _parts()
    hv.fail = {3}
    with pytest.raises(ResizeError):
        trio.run(cpu.set_container, "a", LIMIT)
    assert calls == ["hv 3"] and hv.vcpus == 1


def test_a_failed_shrink_onlines_the_guest_cpus_again():
    cpu, hv, guest, calls = _parts()
    assert trio.run(cpu.set_container, "a", LIMIT) == 3
    hv.fail = {1}
    with pytest.raises(ResizeError, match="from 3 to 1 vCPUs"):
        trio.run(cpu.remove_container, "a")
    assert calls[2:] == ["agent 1 (had 3)", "hv 1", "agent 3 (had 1)"]
    assert guest.online == 3 and hv.vcpus == 3 and cpu.vcpus == 3 and "a" in cpu.limits
