"""Live vCPU resize on the built-in VMM: all max_vcpus vCPUs created at start (MP table lists them),
the guest boots with ``maxcpus=1`` and katapy.resource.cpu has the agent online/offline the others.
``kvm``: runs in the nested harness on kvm-pvm.
"""
from __future__ import annotations

import dataclasses

import pytest
import trio

from katapy import config
from katapy.testing.sandbox import missing_requirements, sandbox_vm

DIAL_TIMEOUT_S = 240.0  # as test_builtin_agent: the L2 needs ~25 s of its own time under the harness
MAX_VCPUS = 2  # the harness L1 has 2 vCPUs


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

    from katapy.resource.cpu import CpuResource, VcpuPolicy

    async def main() -> list[tuple[int, ...]]:
        seen = []
        async with sandbox_vm(cfg, backend="builtin") as sb:
            seen.append((await sb.agent.set_online_cpus(1)).online_ids)  # booted with maxcpus=1
            cpu = CpuResource(VcpuPolicy(base=1, floor=1, max_vcpus=MAX_VCPUS), sb.hypervisor, sb.agent, "t")
            assert await cpu.set_container("c", {"cpu": {"quota": 50_000, "period": 100_000}}) == 2
            seen.append((await sb.agent.set_online_cpus(2)).online_ids)
            assert await cpu.remove_container("c") == 1
            seen.append((await sb.agent.set_online_cpus(1)).online_ids)
            assert sb.hypervisor.vcpus == 1  # type: ignore[attr-defined]
            assert "Kernel panic" not in sb.hypervisor.console_log()  # type: ignore[attr-defined]
        return seen

    assert trio.run(main) == [(0,), (0, 1), (0,)]
