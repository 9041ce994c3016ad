"""Live vCPU hotplug on the built-in VMM with a Linux guest: the VM boots with 1 KVM vCPU (the MP table
lists max_vcpus, the guest boots with ``maxcpus=1``); katapy.resource.cpu grows it (the VMM creates
vCPU 1 and its thread, upcall ADD_CPU has the guest online it, the agent's SetOnlineCPUs then finds
it online), shrinks it (the agent offlines CPU 1, DEL_CPU finds it offline, the VMM parks the
thread) and grows it again (the parked vCPU fd is reused; the guest's INIT-SIPI-SIPI restarts it).
``kvm``: runs in the nested harness on kvm-pvm.
"""
from __future__ import annotations

import dataclasses
import threading

import pytest
import trio

from katapy import config
from katapy.testing.sandbox import missing_requirements, sandbox_vm

DIAL_TIMEOUT_S = 240.0  # as test_builtin_agent: the L2 needs ~25 s of its own time under the harness
MAX_VCPUS = 2  # the harness L1 has 2 vCPUs


def _vcpu_threads(before: frozenset[threading.Thread] = frozenset()) -> list[str]:
    """The live vCPU threads not in ``before`` (those of a VM an earlier test in this process still winds
    down are not this VM's)."""
    return sorted(t.name for t in threading.enumerate()
                  if t.name.startswith("katapy-vcpu") and t.is_alive() and t not in before)


@pytest.mark.kvm
@pytest.mark.guest
def test_builtin_vcpus_grow_and_shrink_through_the_agent():
    cfg = config.load(check_files=False)
    cfg = dataclasses.replace(
        cfg,
        hypervisor=dataclasses.replace(cfg.hypervisor, name="builtin", default_vcpus=1, max_vcpus=MAX_VCPUS),
        agent=dataclasses.replace(cfg.agent, dial_timeout=DIAL_TIMEOUT_S),
    )
    reason = missing_requirements(cfg, backend="builtin")
    if reason:
        pytest.skip(f"cannot start a builtin sandbox VM: {reason}")

    from katapy.resource.cpu import CpuResource, ResizeError, VcpuPolicy

    before = frozenset(threading.enumerate())

    async def main() -> list[tuple[tuple[int, ...], list[str], int]]:
        seen = []
        async with sandbox_vm(cfg, backend="builtin") as sb:
            vmm = sb.hypervisor._vmm  # type: ignore[attr-defined]

            async def snap() -> None:
                got = await sb.agent.set_online_cpus(sb.hypervisor.vcpus)  # type: ignore[attr-defined]
                assert got.present == MAX_VCPUS  # the MP table lists max_vcpus CPUs whatever KVM has
                seen.append((got.online_ids, _vcpu_threads(before), len(vmm.built.vcpus)))

            await snap()  # booted with maxcpus=1 and one KVM vCPU
            cpu = CpuResource(VcpuPolicy(base=1, floor=1, max_vcpus=MAX_VCPUS), sb.hypervisor, sb.agent, "t")
            try:
                assert await cpu.set_container("c", {"cpu": {"quota": 50_000, "period": 100_000}}) == 2
            except ResizeError as exc:  # the guest's side of it is on its console
                raise AssertionError(f"{exc}\n--- guest console ---\n"
                                     f"{sb.hypervisor.console_log()[-8000:]}") from exc  # type: ignore[attr-defined]
            assert vmm.vcpu_count() == 2
            await snap()
            assert await cpu.remove_container("c") == 1
            assert vmm.vcpu_count() == 1
            await snap()
            assert await cpu.set_container("c", {"cpu": {"quota": 50_000, "period": 100_000}}) == 2
            await snap()
            assert await cpu.remove_container("c") == 1
            assert sb.hypervisor.vcpus == 1  # type: ignore[attr-defined]
            console = sb.hypervisor.console_log()  # type: ignore[attr-defined]
            assert "Kernel panic" not in console and "BUG:" not in console, console[-4000:]
        return seen

    seen = trio.run(main)
    one, two = ["katapy-vcpu0"], ["katapy-vcpu0", "katapy-vcpu1"]
    assert seen == [
        ((0,), one, 1),  # one vCPU thread, one KVM vCPU
        ((0, 1), two, 2),  # vCPU 1 created, its thread runs, the guest has it online
        ((0,), one, 2),  # offlined, thread stopped, fd parked
        ((0, 1), two, 2),  # the parked fd reused
    ]
    assert _vcpu_threads(before) == []  # nothing leaked
