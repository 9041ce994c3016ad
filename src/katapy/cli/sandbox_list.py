"""``katapy sandbox list`` and ``katapy sandbox inspect ID``: the sandboxes running on this host.

From each ``<state_dir>/<id>/sandbox.json`` (katapy.shim.persist: pids,
containers, pod) and a bounded scrape of the shim's metrics endpoint
(katapy.metrics: hypervisor, VM state, size now); a shim that is gone or
does not answer is listed with what its record says and state ``unknown``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCRAPE_TIMEOUT_S = 2.0


@dataclass
class SandboxInfo:
    id: str
    hypervisor: str = ""
    state: str = "unknown"
    vcpus: int | None = None
    memory_mib: int | None = None
    containers: list[str] = field(default_factory=list)
    shim_pid: int = 0
    shim_alive: bool = False
    vmm_pid: int = 0
    uptime_s: float | None = None
    pod_name: str = ""
    pod_namespace: str = ""
    sandbox_dir: str = ""
    metrics: str = ""  # why the live figures are missing, if they are


def _uptime(pid: int) -> float | None:
    """Seconds since ``pid`` started (proc(5): stat field 22 is clock ticks after boot)."""
    from katapy.metrics import procfs

    stats = procfs.read(pid)
    if stats is None:
        return None
    with open("/proc/uptime") as f:
        boot_s = float(f.read().split()[0])
    return max(0.0, boot_s - stats.start_time_ticks / os.sysconf("SC_CLK_TCK"))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def inspect(sandbox_dir: Path) -> SandboxInfo:
    from katapy.metrics.endpoint import SOCKET_NAME, fetch

    info = SandboxInfo(sandbox_dir.name, sandbox_dir=str(sandbox_dir))
    try:
        rec = json.loads((sandbox_dir / "sandbox.json").read_text())
    except (OSError, ValueError):
        rec = {}
    if isinstance(rec, dict):
        info.containers = [c for c in rec.get("containers", []) if isinstance(c, str)]
        info.shim_pid = int(rec.get("shim_pid") or 0)
        info.vmm_pid = int(rec.get("vmm_pid") or 0)
        info.pod_name = str(rec.get("pod_name") or "")
        info.pod_namespace = str(rec.get("pod_namespace") or "")
    info.shim_alive = _alive(info.shim_pid)
    if info.shim_alive:
        info.uptime_s = _uptime(info.shim_pid)
    try:
        text = fetch(sandbox_dir / SOCKET_NAME, SCRAPE_TIMEOUT_S).decode()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        info.metrics = f"no answer from the shim's metrics endpoint: {exc}"
        return info
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "katapy_sandbox_info":
                info.hypervisor, info.state = s.labels.get("hypervisor", ""), s.labels.get("vm_state", "unknown")
            elif s.name == "katapy_hypervisor_vcpus":
                info.vcpus = int(s.value)
            elif s.name == "katapy_hypervisor_memory_bytes":
                info.memory_mib = int(s.value) >> 20
    return info


def sandboxes(state_dir: Path) -> list[SandboxInfo]:
    try:
        dirs = sorted(d for d in state_dir.iterdir() if (d / "sandbox.json").is_file())
    except OSError:
        return []
    return [inspect(d) for d in dirs]


def _fmt_uptime(s: float | None) -> str:
    if s is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(s)) if s < 86400 else f"{s / 86400:.1f}d"


def print_table(infos: list[SandboxInfo], out: Any = sys.stdout) -> None:
    rows = [("SANDBOX", "HYPERVISOR", "STATE", "VCPUS", "MEMORY", "CONTAINERS", "SHIM PID", "UPTIME")]
    for i in infos:
        rows.append((i.id, i.hypervisor or "-", i.state, "-" if i.vcpus is None else str(i.vcpus),
                     "-" if i.memory_mib is None else f"{i.memory_mib}Mi", str(len(i.containers)),
                     f"{i.shim_pid}" + ("" if i.shim_alive else " (gone)"), _fmt_uptime(i.uptime_s)))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def as_json(info: SandboxInfo) -> str:
    return json.dumps(asdict(info), indent=2)
