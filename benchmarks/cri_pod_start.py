"""RunPodSandbox -> container running, katapy vs runc, on the same private containerd (CRI v1, kubelet's calls).

    python -m benchmarks.cri_pod_start [--runs N] [--idle SECONDS] [--memory MIB]

Each sample: RunPodSandbox (CNI bridge networking), CreateContainer +
StartContainer of a busybox ``sleep``, until ContainerStatus says RUNNING;
the pod is then stopped and removed (not timed).  While a katapy pod runs,
its host overhead is measured: the PSS (``/proc/<pid>/smaps_rollup``) of the
katapy shim and the QEMU process, summed (shared pages counted once across
processes, so guest RAM touched by the guest and mapped by both QEMU and the
shim's vhost-user back ends is not counted twice).  That sum is what
configs/runtimeclass.yaml's ``overhead.podFixed.memory`` is set from.  The
same processes' CPU time (utime + stime, /proc/<pid>/stat) over an
``--idle`` second window with the pod running gives ``overhead.podFixed.cpu``
(millicores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import Comparison, header, report

COMMAND = "python -m benchmarks.cri_pod_start"


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (proc(5) /proc/<pid>/stat fields 14 and 15), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def idle_millicores(pids: list[int], window_s: float) -> float:
    """CPU the processes used over ``window_s`` seconds of wall time, in millicores."""
    before = sum(cpu_seconds(p) for p in pids)
    t0 = time.monotonic()
    time.sleep(window_s)
    used = sum(cpu_seconds(p) for p in pids) - before
    return 1000.0 * used / (time.monotonic() - t0)


@dataclass
class Overhead:
    """A running katapy pod's host cost: shim + VMM PSS (MiB) and idle CPU (millicores)."""

    idle_s: float
    pss_mib: list[float] = field(default_factory=list)
    shim_pss_mib: list[float] = field(default_factory=list)
    vmm_pss_mib: list[float] = field(default_factory=list)
    cpu_millicores: list[float] = field(default_factory=list)


def one_pod(c, handler: str, n: int, overhead: Overhead | None = None) -> float:
    from katapy.pb import cri_api_pb2 as cri

    cl = c.client
    config = cl.pod_config(f"bench-{handler}-{n}")
    t0 = time.perf_counter()
    pod = cl.run_pod(config, handler)
    try:
        cid = cl.create_container(pod, config, "app", ["sleep", "3600"])
        cl.start_container(cid)
        st = cl.wait_state(cid, cri.CONTAINER_RUNNING, timeout=300)
        elapsed = time.perf_counter() - t0
        if st.state != cri.CONTAINER_RUNNING:
            raise RuntimeError(f"{handler}: container did not reach RUNNING: {st}")
        if overhead is not None:
            shims, vmms = c.shim_pids(), c.qemu_pids()
            pids = shims + vmms
            overhead.shim_pss_mib.append(sum(pss_kib(p) for p in shims) / 1024.0)
            overhead.vmm_pss_mib.append(sum(pss_kib(p) for p in vmms) / 1024.0)
            overhead.pss_mib.append(overhead.shim_pss_mib[-1] + overhead.vmm_pss_mib[-1])
            overhead.cpu_millicores.append(idle_millicores(pids, overhead.idle_s))
        return elapsed
    finally:
        cl.stop_pod(pod)
        cl.remove_pod(pod)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="CRI pod start latency, katapy vs runc")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=256,
                    help="guest default_memory (MiB); 256 is configs/configuration-qemu.toml's")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of CPU sampling per running katapy pod")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("containerd") is None:
        print("cri_pod_start: needs root and containerd")
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from katapy.testing.cri import PrivateCriContainerd
    from tests.cri.conftest import katapy_config_file, katapy_unavailable

    header("CRI RunPodSandbox -> container RUNNING")
    base = Path(tempfile.mkdtemp(prefix="kpbench-", dir="/tmp"))
    c = PrivateCriContainerd(base, katapy_config=katapy_config_file(base, default_memory=args.memory))
    try:
        c.start()
        c.import_images()
        runc = [one_pod(c, "runc", i) for i in range(args.runs)]
        why = katapy_unavailable()
        if why:
            print(f"runc: {[round(x, 3) for x in runc]} s; katapy not measured: {why}")
            return 1
        overhead = Overhead(idle_s=args.idle)
        try:
            katapy = [one_pod(c, "katapy", i, overhead) for i in range(args.runs)]
        except Exception as exc:  # noqa: BLE001 - say why katapy could not be measured
            detail = getattr(exc, "details", lambda: str(exc))()
            print(f"runc: {[round(x, 3) for x in runc]} s; katapy pod failed: {detail}")
            return 1
        report(Comparison("pod start (RunPodSandbox..RUNNING)", "katapy", katapy, "runc", runc, command=COMMAND))
        print(f"katapy host overhead per pod (shim + QEMU PSS): {[round(x) for x in overhead.pss_mib]} MiB, "
              f"median {statistics.median(overhead.pss_mib):.0f} MiB (shim "
              f"{statistics.median(overhead.shim_pss_mib):.0f} + QEMU {statistics.median(overhead.vmm_pss_mib):.0f}; "
              f"guest default_memory {args.memory} MiB)")
        print(f"katapy idle CPU per pod (shim + QEMU, {args.idle:g} s window): "
              f"{[round(x) for x in overhead.cpu_millicores]} millicores, "
              f"median {statistics.median(overhead.cpu_millicores):.0f}m")
        return 0
    finally:
        c.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
