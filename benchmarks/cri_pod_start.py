"""RunPodSandbox -> container running, katapy vs runc, on the same private containerd (CRI v1, kubelet's calls).

    python -m benchmarks.cri_pod_start [--runs N] [--katapy-config PATH]

Each sample: RunPodSandbox (CNI bridge networking), CreateContainer +
StartContainer of a busybox ``sleep``, until ContainerStatus says RUNNING;
the pod is then stopped and removed (not timed).  While a katapy pod runs,
its host overhead is measured: the PSS (``/proc/<pid>/smaps_rollup``) of the
katapy shim and the QEMU process, summed (shared pages counted once across
processes, so guest RAM touched by the guest and mapped by both QEMU and the
shim's vhost-user back ends is not counted twice).  That sum is what
configs/runtimeclass.yaml's ``overhead.podFixed.memory`` is set from.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
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


def one_pod(c, handler: str, n: int, overhead: list[float] | None = None) -> float:
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
            pids = c.shim_pids() + c.qemu_pids()
            overhead.append(sum(pss_kib(p) for p in pids) / 1024.0)
        return elapsed
    finally:
        cl.stop_pod(pod)
        cl.remove_pod(pod)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="CRI pod start latency, katapy vs runc")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("containerd") is None:
        print("cri_pod_start: needs root and containerd")
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from katapy.testing.cri import PrivateCriContainerd
    from tests.cri.conftest import katapy_config_file, katapy_unavailable

    header("CRI RunPodSandbox -> container RUNNING")
    base = Path(tempfile.mkdtemp(prefix="kpbench-", dir="/tmp"))
    c = PrivateCriContainerd(base, katapy_config=katapy_config_file(base))
    try:
        c.start()
        c.import_images()
        runc = [one_pod(c, "runc", i) for i in range(args.runs)]
        why = katapy_unavailable()
        if why:
            print(f"runc: {[round(x, 3) for x in runc]} s; katapy not measured: {why}")
            return 1
        overhead: list[float] = []
        try:
            katapy = [one_pod(c, "katapy", i, overhead) for i in range(args.runs)]
        except Exception as exc:  # noqa: BLE001 - say why katapy could not be measured
            detail = getattr(exc, "details", lambda: str(exc))()
            print(f"runc: {[round(x, 3) for x in runc]} s; katapy pod failed: {detail}")
            return 1
        report(Comparison("pod start (RunPodSandbox..RUNNING)", "katapy", katapy, "runc", runc, command=COMMAND))
        print(f"katapy host overhead per pod (shim + QEMU PSS): {[round(x) for x in overhead]} MiB")
        return 0
    finally:
        c.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
