"""Live vCPU resize latency on the qemu backend, request to usable, against the cgroup-only update of before.

    python -m benchmarks.vcpu_resize [--runs N]

One QEMU microvm guest (TCG on kvm-pvm hosts) with ``max_vcpus`` = 4 present and
1 online at boot (``maxcpus=1``), a busybox container in it, all through the
real AgentClient and katapy.resource.cpu (the path UpdateTask takes):

* grow 1 -> 4: ``CpuResource.set_container`` (hypervisor resize_vcpus, then the
  agent's SetOnlineCPUs) plus ``UpdateContainer`` of the container's cgroup,
  until ``nproc`` exec'd in the container prints 4;
* shrink 4 -> 1: the same back, until ``nproc`` prints 1;
* reference (measured in the same guest, same run): what katapy did before for
  the same UpdateTask, ``UpdateContainer`` of the cgroup only, then the same
  ``nproc`` exec (which prints the unchanged count).

The ratio is the cost of the resize on top of an update; the agent's
SetOnlineCPUs alone (sysfs writes in the guest, no exec) is printed as well.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import trio

from benchmarks.common import Comparison, header, report

COMMAND = "python -m benchmarks.vcpu_resize"
CID = "bench"
MAX_VCPUS = 4
QUOTA_4 = {"cpu": {"quota": 300_000, "period": 100_000}}  # 1 + ceil(3) = 4 vCPUs
NO_QUOTA = {"cpu": {"quota": -1, "period": 100_000}}


async def nproc(agent, exec_id: str) -> int:  # type: ignore[no-untyped-def]
    from agent.helpers import process_spec

    await agent.exec_process(CID, exec_id, process_spec(["nproc"]))
    out = b""
    while not out.endswith(b"\n"):
        chunk = await agent.read_stdout(CID, exec_id, 64)
        if not chunk:
            break
        out += chunk
    await agent.wait_process(CID, exec_id)
    return int(out.strip())


async def measure(sb, runs: int) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    from agent.helpers import make_busybox_rootfs, make_spec

    from katapy.agent_client.types import Storage
    from katapy.resource.cpu import CpuResource, VcpuPolicy

    make_busybox_rootfs(sb.shared_dir / CID / "rootfs")
    share = Storage(driver="virtio-fs", source="katapy-shared", fstype="virtiofs", mount_point="/run/katapy/shared")
    await sb.agent.create_sandbox("bench", [], "bench", [share])
    await sb.agent.create_container(CID, CID, make_spec(f"/run/katapy/shared/{CID}/rootfs", ["sleep", "600"], CID))
    await sb.agent.start_container(CID)
    cpu = CpuResource(VcpuPolicy(base=1, floor=1, max_vcpus=MAX_VCPUS), sb.hypervisor, sb.agent, "bench")
    out: dict[str, list[float]] = {"grow": [], "shrink": [], "cgroup": [], "agent_online": [], "agent_offline": []}
    n = 0

    async def step(resources: dict, want: int, key: str, resize: bool) -> None:
        nonlocal n
        n += 1
        t0 = time.perf_counter()
        if resize:
            await cpu.set_container(CID, resources)
        await sb.agent.update_container(CID, resources)
        got = await nproc(sb.agent, f"e{n}")
        out[key].append(time.perf_counter() - t0)
        assert got == want, (key, got, want)

    for _ in range(runs):
        await step(NO_QUOTA, 1, "cgroup", resize=False)
        await step(QUOTA_4, MAX_VCPUS, "grow", resize=True)
        await step(NO_QUOTA, 1, "shrink", resize=True)
        for key, count in (("agent_online", MAX_VCPUS), ("agent_offline", 1)):
            t0 = time.perf_counter()
            assert (await sb.agent.set_online_cpus(count)).online == count
            out[key].append(time.perf_counter() - t0)
    await sb.agent.remove_container(CID, 10)
    return out


def run(runs: int) -> dict[str, list[float]]:
    import dataclasses

    from katapy import config as kconfig
    from katapy.testing.sandbox import missing_requirements, sandbox_vm

    cfg = kconfig.load(check_files=False)
    cfg = dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, name="qemu", default_vcpus=1,
                                                                  max_vcpus=MAX_VCPUS))
    reason = missing_requirements(cfg, backend="qemu")
    if reason:
        raise RuntimeError(reason)

    async def main() -> dict[str, list[float]]:
        async with sandbox_vm(cfg, backend="qemu") as sb:
            return await measure(sb, runs)

    return trio.run(main)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="vCPU resize latency: grow/shrink vs the cgroup-only update")
    ap.add_argument("--runs", type=int, default=5)
    runs = ap.parse_args(argv).runs
    header(f"vCPU resize on the qemu backend: 1 <-> {MAX_VCPUS} vCPUs, request to nproc")
    if os.geteuid() != 0:  # crun runs in the guest only; the host needs root for QEMU's state and the rootfs
        print("vcpu_resize: not measured: needs root")
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/agent helpers
    try:
        r = run(runs)
    except Exception as exc:  # noqa: BLE001 - say why it could not be measured
        print(f"vcpu_resize: not measured: {exc}")
        return 1
    ref = "cgroup-only update (before)"
    report(Comparison(f"grow 1 -> {MAX_VCPUS}", "resize + update + nproc", r["grow"], ref, r["cgroup"],
                      command=COMMAND))
    report(Comparison(f"shrink {MAX_VCPUS} -> 1", "resize + update + nproc", r["shrink"], ref, r["cgroup"],
                      command=COMMAND))
    report(Comparison("guest sysfs online vs offline", f"SetOnlineCPUs 1 -> {MAX_VCPUS}", r["agent_online"],
                      f"SetOnlineCPUs {MAX_VCPUS} -> 1", r["agent_offline"], command=COMMAND))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
