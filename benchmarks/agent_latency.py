"""Agent latency in a guest vs the same agent as a host process (the reference, measured in the same run).

    python -m benchmarks.agent_latency [--runs N] [--backend qemu|builtin]

Two numbers, each through the real AgentClient:

* health-check round trip (grpc.Health/Check over ttrpc): hybrid vsock into
  the guest (katapy's vsock back end) vs a unix socket to the host process;
* exec-to-first-output: ExecProcess of ``echo`` into a running busybox
  container, until the first ReadStdout returns bytes (crun exec in the
  guest vs on the host).

Also printed: the guest's uptime when the agent said it was ready (its
``agent ready uptime_s=`` log line), i.e. kernel boot + Python start-up.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from benchmarks.common import Comparison, header, report

COMMAND = "python -m benchmarks.agent_latency"
CID = "bench"


async def measure(agent, rootfs: str, storages: list, runs: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    from agent.helpers import make_spec, process_spec

    health: list[float] = []
    for _ in range(runs * 10):
        t0 = time.perf_counter()
        assert await agent.health_check()
        health.append(time.perf_counter() - t0)
    await agent.create_sandbox("bench", [], "bench", storages)
    await agent.create_container(CID, CID, make_spec(rootfs, ["sleep", "600"], CID))
    await agent.start_container(CID)
    exec_first: list[float] = []
    for i in range(runs):
        exec_id = f"e{i}"
        t0 = time.perf_counter()
        await agent.exec_process(CID, exec_id, process_spec(["echo", "hi"]))
        first = await agent.read_stdout(CID, exec_id, 4096)
        exec_first.append(time.perf_counter() - t0)
        assert first.startswith(b"hi"), first
        await agent.wait_process(CID, exec_id)
    await agent.remove_container(CID, 10)
    await agent.destroy_sandbox()
    return health, exec_first


def host_reference(runs: int, workdir: Path) -> tuple[list[float], list[float]]:
    from agent.helpers import HostAgent, cleanup_cgroups, make_busybox_rootfs

    from katapy.agent_client import AgentClient

    (workdir / "host").mkdir()
    host = HostAgent(workdir / "host")
    try:
        rootfs = make_busybox_rootfs(workdir / "host-rootfs")

        async def main() -> tuple[list[float], list[float]]:
            async with await AgentClient.connect_unix(host.socket, timeout=30) as agent:
                return await measure(agent, str(rootfs), [], runs)

        return trio.run(main)
    finally:
        host.stop()
        cleanup_cgroups()


def guest(runs: int, backend: str) -> tuple[list[float], list[float], str]:
    from agent.guest import GuestAgent, guest_config
    from agent.helpers import make_busybox_rootfs

    from katapy.agent_client import AgentClient

    cfg, reason = guest_config(backend)
    if reason:
        raise RuntimeError(reason)
    g = GuestAgent(cfg, backend)
    try:
        make_busybox_rootfs(g.shared_dir / CID / "rootfs")
        target = g.target()

        async def main() -> tuple[list[float], list[float]]:
            async with await AgentClient.connect(g.uds, port=g.port, timeout=30) as agent:
                return await measure(agent, f"/run/katapy/shared/{CID}/rootfs", target.storages, runs)

        health, exec_first = trio.run(main)
        ready = re.search(r'event="agent ready".*uptime_s=([0-9.]+)', g.console())
        return health, exec_first, ready.group(1) if ready else "not logged"
    finally:
        g.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="agent latency: guest vs host process")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--backend", default="qemu")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("crun") is None:
        print("agent_latency: needs root and crun (the host-process reference runs containers)")
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/agent helpers
    header(f"agent latency: {args.backend} guest vs host process")
    workdir = Path(tempfile.mkdtemp(prefix="kpagent-", dir="/tmp"))
    try:
        h_health, h_exec = host_reference(args.runs, workdir)
        try:
            g_health, g_exec, uptime = guest(args.runs, args.backend)
        except Exception as exc:  # noqa: BLE001 - say why the guest could not be measured
            print(f"host agent only: health {statistics_ms(h_health)}, exec {statistics_ms(h_exec)}; "
                  f"guest not measured: {exc}")
            return 1
        report(Comparison("health-check round trip", f"{args.backend} guest", g_health, "host process", h_health,
                          command=COMMAND))
        report(Comparison("exec-to-first-output", f"{args.backend} guest", g_exec, "host process", h_exec,
                          command=COMMAND))
        print(f"guest uptime at 'agent ready': {uptime} s")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def statistics_ms(xs: list[float]) -> str:
    import statistics

    return f"{statistics.median(xs) * 1e3:.2f} ms (median of {len(xs)})"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
