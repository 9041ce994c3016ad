"""``ctr run --rm <image> true`` latency, katapy vs runc, on one private containerd in the same run.

    python -m benchmarks.ctr_run [--runs N] [--keep]

Samples alternate nothing: first the runc runs (``io.containerd.runc.v2``),
then the katapy runs (``io.containerd.katapy.v2``), each a fresh container
and, for katapy, a fresh sandbox VM.  The katapy time is broken down from the
shim's own log lines (containerd copies them into its log):

* shim start       ``ctr run`` issued -> the shim daemon serving ("shim serving")
* VM start         QEMU (or the built-in VMM) spawned and running ("sandbox started" ``vm_start_s``)
* agent ready      guest kernel boot + agent up, first Health.Check answered (``agent_connect_s``)
* sandbox setup    CreateSandbox: virtio-fs mount etc. (``create_sandbox_s``)
* container create rootfs share + CreateContainer in the guest ("container created" ``create_s``)
* container start  StartContainer ("process started" ``start_s``)
* exit + teardown  the rest: the process runs, exits, the VM stops, containerd deletes

Then one katapy sandbox is left running (``sleep``) and the host cost of the
shim is measured: RSS and PSS (``/proc/<pid>/smaps_rollup``) and thread count,
next to the runc shim's for the same kind of container, and the VMM's (QEMU)
PSS.  PSS counts pages shared between processes once in total, so guest RAM
mapped by both QEMU and the shim's vhost-user back ends is not counted twice.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Comparison, header, report

COMMAND = "python -m benchmarks.ctr_run"
IMAGE = "docker.io/katapy/busybox:latest"
KATAPY = "io.containerd.katapy.v2"
BOOT_TIMEOUT = 300
_KV = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")
STEPS = ("shim start", "VM start", "agent ready", "sandbox setup", "container create", "container start",
         "exit + teardown")


def parse_line(line: str) -> dict[str, str]:
    """One ``key=value`` log line (structlog's KeyValueRenderer, or containerd's logrus) as a dict."""
    return {k: v[1:-1] if v[:1] in "'\"" else v for k, v in _KV.findall(line)}


def _ts(fields: dict[str, str]) -> float:
    return dt.datetime.fromisoformat(fields["time"].replace("Z", "+00:00")).timestamp()


def breakdown(log_lines: list[str], cid: str, t0: float, total: float) -> dict[str, float] | None:
    """The katapy steps of container ``cid`` (seconds), from the shim's log; None if a line is missing."""
    want = {"shim serving": "id", "sandbox started": "sandbox_id", "container created": "container_id",
            "process started": "container_id"}
    seen: dict[str, dict[str, str]] = {}
    for line in log_lines:
        if cid not in line:
            continue
        f = parse_line(line)
        key = want.get(f.get("event", ""))
        if key and f.get(key) == cid and f["event"] not in seen:
            seen[f["event"]] = f
    if len(seen) != len(want):
        return None
    sb = seen["sandbox started"]
    out = {
        "shim start": _ts(seen["shim serving"]) - t0,
        "VM start": float(sb["vm_start_s"]),
        "agent ready": float(sb["agent_connect_s"]),
        "sandbox setup": float(sb["create_sandbox_s"]),
        "container create": float(seen["container created"]["create_s"]),
        "container start": float(seen["process started"]["start_s"]),
    }
    out["exit + teardown"] = t0 + total - _ts(seen["process started"])
    return out


def proc_usage(pid: int) -> dict[str, float]:
    """RSS and PSS (MiB) and thread count of one process."""
    out = {"rss_mib": 0.0, "pss_mib": 0.0, "threads": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = float(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss_mib"] = int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return out


def _pids_matching(*needles: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(n in cmdline for n in needles):
                found.append(int(entry))
    return found


def _ctr_run(c, cid: str, runtime: str | None, *cmd: str) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    c.ctr("run", "--rm", *(["--runtime", runtime] if runtime else []), IMAGE, cid, *cmd, timeout=BOOT_TIMEOUT)
    return time.perf_counter() - t


def _footprint(c, runtime: str | None, cid: str) -> tuple[dict[str, float], list[dict[str, float]]]:  # type: ignore[no-untyped-def]
    """Start ``sleep`` detached; the shim's usage and (katapy) the VMM processes' usage; then remove it."""
    c.ctr("run", "-d", *(["--runtime", runtime] if runtime else []), IMAGE, cid, "sleep", "600",
          timeout=BOOT_TIMEOUT)
    try:
        time.sleep(2)  # let start-up transients settle
        shims = _pids_matching("-id", cid, "-namespace", c.namespace)
        shim = proc_usage(shims[0]) if shims else {}
        vmm = [proc_usage(p) for p in _pids_matching("qemu-system", str(c.katapy_state / cid))]
        return shim, vmm
    finally:
        c.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and c.ctr("task", "delete", cid, check=False).returncode != 0:
            time.sleep(0.5)
        c.ctr("task", "delete", "-f", cid, check=False)
        c.ctr("containers", "rm", cid, check=False)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="ctr run --rm true latency, katapy vs runc")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the private containerd's directory (logs)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("containerd") is None or shutil.which("ctr") is None:
        print("ctr_run: needs root, containerd and ctr")
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from katapy import paths
    from katapy.testing.busybox_image import build
    from tests.shim.containerd import PrivateContainerd

    if not paths.guest_initramfs().exists():
        print(f"ctr_run: guest image {paths.guest_initramfs()} not built (make image)")
        return 1
    header("ctr run --rm <busybox> true: katapy vs runc")
    base = Path(tempfile.mkdtemp(prefix="kpbench-ctr-", dir="/tmp"))
    c = PrivateContainerd(base)
    try:
        c.start()
        c.import_image(build(base / "busybox.tar", IMAGE))
        runc = [_ctr_run(c, f"bench-runc-{i}", None, "true") for i in range(args.runs)]
        ours: list[float] = []
        steps: list[dict[str, float]] = []
        for i in range(args.runs):
            cid = f"bench-kp-{i}"
            t0 = time.time()
            ours.append(_ctr_run(c, cid, KATAPY, "true"))
            b = breakdown(c.log_path.read_text(errors="replace").splitlines(), cid, t0, ours[-1])
            if b is not None:
                steps.append(b)
        report(Comparison("ctr run --rm true", "katapy", ours, "runc", runc, command=COMMAND))
        if steps:
            print(f"  katapy breakdown (median of {len(steps)}; from the shim's log):")
            for name in STEPS:
                print(f"    {name:<17} {statistics.median(s[name] for s in steps) * 1e3:8.0f} ms")
        else:
            print("  katapy breakdown: the shim's timing lines were not found in containerd's log")
        kp_shim, kp_vmm = _footprint(c, KATAPY, "bench-kp-mem")
        runc_shim, _ = _footprint(c, None, "bench-runc-mem")
        if kp_shim and runc_shim:
            for key, unit in (("pss_mib", "MiB"), ("rss_mib", "MiB"), ("threads", "threads")):
                label = key.split("_")[0].upper() if unit == "MiB" else key
                report(Comparison(f"shim per sandbox, {label}",
                                  "katapy shim", [kp_shim[key]], "runc shim", [runc_shim[key]], unit=unit))
        for usage in kp_vmm:
            print(f"  katapy VMM process (QEMU): PSS {usage['pss_mib']:.1f} MiB, RSS {usage['rss_mib']:.1f} MiB, "
                  f"{usage['threads']:.0f} threads")
        if kp_vmm and kp_shim:
            total = kp_shim["pss_mib"] + sum(u["pss_mib"] for u in kp_vmm)
            print(f"  katapy host cost per sandbox (shim + VMM PSS): {total:.1f} MiB")
        return 0
    finally:
        if args.keep:
            c.kill_shims()
            c.stop()
            c.unmount_all()
            print(f"kept {base}")
        else:
            c.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
