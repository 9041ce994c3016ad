"""Building blocks for agent tests: a busybox rootfs, OCI specs, and a host-process agent.

The same test bodies run against any agent reachable by an :class:`AgentTarget`:
the host-process agent here (``--listen unix:``), or the agent as PID 1 of a
guest VM reached over hybrid vsock (tests/agent/guest.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from katapy.agent_client import AgentClient
from katapy.agent_client.types import Storage

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
# Containers' cgroups go under a parent unique to this test process, removed at teardown.
CGROUP_PARENT = f"katapy-agent-test-{os.getpid()}"


@dataclass
class AgentTarget:
    """How a test reaches an agent and gives its containers a root filesystem.

    ``storages`` are what CreateSandbox must carry for ``rootfs`` paths to
    exist (in a guest: the virtio-fs share, as the shim sends it);
    ``raw_connect`` opens a byte stream straight to the agent's ttrpc
    listener (for garbage on the wire); ``alive`` says whether the agent's
    process (host) or VM (guest) is still running.
    """

    connect: Callable[[], Awaitable[AgentClient]]
    rootfs: Callable[[str], str]  # container id -> guest path of a busybox rootfs
    description: str
    raw_connect: Callable[[], socket.socket]
    alive: Callable[[], bool]
    scratch: str  # a directory path in the agent's filesystem tests may mount storages under
    resolv_conf: str  # where the agent writes CreateSandbox's DNS lines
    in_guest: bool = False
    storages: list[Storage] = field(default_factory=list)

    def sandbox_storages(self, *extra: Storage) -> list[Storage]:
        """CreateSandbox's storages: the target's own (the share) and the test's."""
        return [*self.storages, *extra]


def make_busybox_rootfs(root: Path) -> Path:
    """A minimal root filesystem: static busybox and one symlink per applet."""
    (root / "bin").mkdir(parents=True)
    for d in ("proc", "dev", "sys", "tmp", "etc", "root"):
        (root / d).mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


def make_spec(rootfs: str, args: list[str], cid: str, *, terminal: bool = False,
              memory_limit: int | None = None, env: list[str] | None = None,
              pid_namespace: bool = True, extra_caps: tuple[str, ...] = ()) -> dict[str, Any]:
    """An OCI config.json for a busybox container (runtime-spec config.md / config-linux.md)."""
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_limit is not None:
        resources["memory"] = {"limit": memory_limit, "swap": memory_limit}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env or ["PATH=/bin", "HOME=/root", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {k: ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", *extra_caps]
                             for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": f"h-{cid[:20]}",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount") if pid_namespace or t != "pid"],
            "resources": resources,
            "cgroupsPath": f"/{CGROUP_PARENT}/{cid}",
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
        },
    }


def process_spec(args: list[str], *, terminal: bool = False) -> dict[str, Any]:
    return {"terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/"}


class HostAgent:
    """``python -m katapy.agent --listen unix:`` as a host process in private UTS + mount namespaces.

    The namespaces keep CreateSandbox's hostname and the containers' mounts
    off the host; ``prefix`` can put it in a network namespace too.
    """

    def __init__(self, workdir: Path, prefix: list[str] | None = None) -> None:
        self.workdir = workdir
        self.socket = workdir / "agent.sock"
        self.state = workdir / "state"
        self.resolv_conf = workdir / "resolv.conf"
        self.log_path = workdir / "agent.log"
        # This host is cgroup v1 "hybrid" with hugetlb on the v2 hierarchy,
        # which crun refuses ("cgroups in hybrid mode not supported"); inside
        # the agent's private mount namespace the v2 mount is detached so crun
        # sees plain v1.  The host's own mounts are untouched.
        argv = [*(prefix or []), "unshare", "--uts", "--mount", "--propagation", "private", "--",
                "sh", "-c", 'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec "$@"', "agent",
                sys.executable, "-m", "katapy.agent", "--listen", f"unix:{self.socket}",
                "--state-dir", str(self.state), "--resolv-conf", str(self.resolv_conf), "--log-level", "debug"]
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"agent did not start: {self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def cleanup_cgroups(parent: str = CGROUP_PARENT) -> list[int]:
    """Thaw, kill and remove whatever a failed test left under ``parent`` (v1 and v2); the pids killed."""
    killed: list[int] = []
    for top in Path("/sys/fs/cgroup").glob(f"*/{parent}"):
        for state in top.rglob("freezer.state"):
            state.write_text("THAWED")
        for procs in top.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                except ProcessLookupError:
                    pass
    deadline = time.monotonic() + 10
    for top in Path("/sys/fs/cgroup").glob(f"*/{parent}"):
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
    return killed
