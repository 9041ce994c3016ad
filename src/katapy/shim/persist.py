"""What a running shim records on disk so that ``delete`` can clean up after it dies.

``<state_dir>/<sandbox_id>/sandbox.json`` (Kata keeps the same kind of
record under /run/vc/sbs): the share directory, the sandbox cgroup
directories (whose ``cgroup.procs`` name every VMM process), the shim's pid
and the containers sharing the VM.  Written atomically (temp file + rename).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECORD = "sandbox.json"


@dataclass
class SandboxRecord:
    sandbox_id: str
    sandbox_dir: str  # <state_dir>/<sandbox_id>
    shared_dir: str
    cgroup_dirs: list[str] = field(default_factory=list)
    shim_pid: int = 0
    vmm_pid: int = 0
    containers: list[str] = field(default_factory=list)
    pod_name: str = ""  # CRI's io.kubernetes.cri.sandbox-name, when the sandbox is a pod
    pod_namespace: str = ""  # io.kubernetes.cri.sandbox-namespace
    agent_socket: str = ""  # the VMM's hybrid-vsock socket (``katapy exec`` dials the debug console there)
    debug_console: bool = False  # the guest serves the debug console (``debug_console = true``)

    def save(self) -> None:
        d = Path(self.sandbox_dir)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{RECORD}.{os.getpid()}"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, d / RECORD)

    @classmethod
    def load(cls, sandbox_dir: Path) -> SandboxRecord | None:
        try:
            raw = json.loads((sandbox_dir / RECORD).read_text())
            return cls(**raw)
        except (OSError, ValueError, TypeError):
            return None
