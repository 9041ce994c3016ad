"""The product path on hardware-style KVM: the builtin hypervisor backend (katapy.vmm in this
process) boots katapy's guest kernel + image with vsock and virtio-fs on virtio-mmio, and the agent
answers over hybrid vsock.  ``kvm``: runs in the nested harness on kvm-pvm.
"""
from __future__ import annotations

import dataclasses

import pytest
import trio

from katapy import config
from katapy.testing.sandbox import missing_requirements, sandbox_vm

# Under the harness (L2 inside a TCG L1) the guest needs ~25 s of its own time to the agent.
DIAL_TIMEOUT_S = 240.0


@pytest.mark.kvm
@pytest.mark.guest
@pytest.mark.parametrize("vcpus", [1, 2])
def test_agent_health_over_hybrid_vsock_from_builtin_vmm(vcpus):
    cfg = config.load(check_files=False)
    cfg = dataclasses.replace(
        cfg,
        hypervisor=dataclasses.replace(cfg.hypervisor, name="builtin", default_vcpus=vcpus),
        agent=dataclasses.replace(cfg.agent, dial_timeout=DIAL_TIMEOUT_S),
    )
    reason = missing_requirements(cfg, backend="builtin")
    if reason:
        pytest.skip(f"cannot start a builtin sandbox VM: {reason}")

    from katapy.agent_client.types import Storage

    share = Storage(driver="virtio-fs", source="katapy-shared", fstype="virtiofs", mount_point="/run/katapy/shared")

    async def main() -> tuple[bool, str, str, dict]:
        async with sandbox_vm(cfg, backend="builtin") as sb:
            healthy = await sb.agent.health_check()
            version = await sb.agent.version()
            # the agent mounts virtio-fs (FsDevice on the VMM's virtio-mmio transport): FUSE INIT,
            # LOOKUP and GETATTR over the MMIO queues must work or CreateSandbox fails
            await sb.agent.create_sandbox("builtin-test", [], "builtin-test", [share])
            await sb.agent.destroy_sandbox()
            console = sb.hypervisor.console_log()  # type: ignore[attr-defined]
            return healthy, version, console, dict(sb.times)

    healthy, version, console, times = trio.run(main)
    assert healthy is True and version
    assert "katapy-agent: ready port=1024" in console
    print(f"builtin VMM, {vcpus} vCPU(s): {times}")
