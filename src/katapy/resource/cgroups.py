"""The host-side sandbox cgroup that holds the VMM (Kata's "sandbox cgroup").

The shim moves itself into ``katapy/<sandbox_id>`` before it starts the VM,
so the in-process VMM's threads and an external VMM it spawns (QEMU) are
accounted and limited together, and ``delete`` after a crashed shim can find
and kill every process of the sandbox from ``cgroup.procs``.

Both hierarchies are handled (kernel Documentation/admin-guide/cgroup-v2.rst,
cgroup-v1/cgroups.rst): on a unified (v2) mount one directory under
/sys/fs/cgroup; on v1 (or hybrid) one directory per controller in
:data:`V1_CONTROLLERS` that is mounted.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from katapy import log

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "katapy"
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")


class CgroupError(OSError):
    """The sandbox cgroup cannot be created, joined or removed."""


def is_unified(root: Path = CGROUP_ROOT) -> bool:
    """True when ``root`` is a cgroup2 mount (the file cgroup.controllers exists only there)."""
    return (root / "cgroup.controllers").exists()


@dataclass
class SandboxCgroup:
    """One sandbox's cgroup directories (one on v2, one per controller on v1)."""

    sandbox_id: str
    dirs: list[Path] = field(default_factory=list)

    @classmethod
    def paths_for(cls, sandbox_id: str, root: Path = CGROUP_ROOT) -> list[Path]:
        if "/" in sandbox_id or sandbox_id in ("", ".", ".."):
            raise CgroupError(errno.EINVAL, f"bad sandbox id for a cgroup name: {sandbox_id!r}")
        if is_unified(root):
            return [root / PARENT / sandbox_id]
        return [root / c / PARENT / sandbox_id for c in V1_CONTROLLERS if (root / c / "cgroup.procs").exists()]

    @classmethod
    def create(cls, sandbox_id: str, root: Path = CGROUP_ROOT) -> SandboxCgroup:
        cg = cls(sandbox_id, [])
        try:
            for d in cls.paths_for(sandbox_id, root):
                d.mkdir(parents=True, exist_ok=True)
                cg.dirs.append(d)
        except OSError as exc:
            cg.destroy()
            raise CgroupError(exc.errno or errno.EIO, f"create sandbox cgroup: {exc}") from exc
        if not cg.dirs:
            raise CgroupError(errno.ENOENT, f"no cgroup hierarchy found under {root}")
        log.get("resource.cgroups").info("sandbox cgroup created", sandbox_id=sandbox_id,
                                         dirs=[str(d) for d in cg.dirs])
        return cg

    def add_process(self, pid: int) -> None:
        """Move ``pid`` (all its threads) into every directory of the sandbox cgroup."""
        for d in self.dirs:
            try:
                (d / "cgroup.procs").write_text(f"{pid}\n")
            except OSError as exc:
                raise CgroupError(exc.errno or errno.EIO, f"join {d}: {exc}") from exc

    def set_memory_limit(self, limit_bytes: int) -> None:
        """memory.max (v2) or memory.limit_in_bytes (v1)."""
        for d in self.dirs:
            for name in ("memory.max", "memory.limit_in_bytes"):
                if (d / name).exists():
                    (d / name).write_text(f"{limit_bytes}\n")

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                continue
        return found

    def kill_all(self, exclude: set[int] | None = None, timeout: float = 5.0) -> None:
        """SIGKILL every process left in the cgroup (not ``exclude``) and wait until they are gone."""
        skip = exclude or set()
        deadline = time.monotonic() + timeout
        while True:
            left = self.pids() - skip
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise CgroupError(errno.EBUSY, f"processes {sorted(left)} survive SIGKILL in {self.dirs[0]}")
            time.sleep(0.02)

    def leave(self, pid: int) -> None:
        """Move ``pid`` back to the parent of the katapy cgroups (before destroy)."""
        for d in self.dirs:
            try:
                (d.parent.parent / "cgroup.procs").write_text(f"{pid}\n")
            except OSError:
                continue

    def destroy(self) -> None:
        """Remove the directories (they must be empty of processes); idempotent."""
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CgroupError(exc.errno or errno.EBUSY, f"remove {d}: {exc}") from exc
        self.dirs.clear()
