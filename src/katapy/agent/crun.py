"""The OCI runtime the agent drives: the ``crun`` command line (crun(1)).

One method per crun verb; every call gets ``--root`` (crun's state directory,
private to this agent) and ``--log`` (crun writes its own errors there, so
they never mix with a container's stdio).  A failing command raises
:class:`CrunError` carrying crun's message.

pivot_root(2) fails with EINVAL while the caller's root is the initial
ramfs ("rootfs", which can never be unmounted), so when the guest runs from
an initramfs containers are created with ``--no-pivot`` (crun then moves the
container root over ``/`` and chroots into it instead).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from katapy.agent.reaper import Reaper

COMMAND_TIMEOUT_S = 60.0


class CrunError(Exception):
    """crun exited non-zero; ``message`` is what it said."""

    def __init__(self, verb: str, code: int, message: str) -> None:
        super().__init__(f"crun {verb} failed (exit {code}): {message}")
        self.verb = verb
        self.code = code
        self.message = message


def find_executable(name: str) -> str | None:
    for directory in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def root_is_initramfs(mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether ``/`` is the kernel's initial ramfs (proc(5) mountinfo: fstype after the " - " separator)."""
    fstype = ""
    try:
        with open(mountinfo) as f:
            for line in f:
                fields, _, tail = line.partition(" - ")
                parts = fields.split()
                if len(parts) >= 5 and parts[4] == "/" and tail:
                    fstype = tail.split()[0]  # the last mount on "/" is the visible one
    except OSError:
        return False
    return fstype == "rootfs"


class Crun:
    def __init__(self, reaper: Reaper, root: str, binary: str | None = None, no_pivot: bool | None = None) -> None:
        found = binary or find_executable("crun")
        if found is None:
            raise FileNotFoundError("crun not found on PATH")
        self.binary = found
        self.root = root
        self.reaper = reaper
        self.no_pivot = root_is_initramfs() if no_pivot is None else no_pivot
        os.makedirs(root, mode=0o700, exist_ok=True)

    def _argv(self, log_path: str, verb: str, args: Sequence[str]) -> list[str]:
        return [self.binary, f"--root={self.root}", f"--log={log_path}", verb, *args]

    def _run(self, log_dir: str, verb: str, args: Sequence[str], fds: dict[int, int] | None = None) -> bytes:
        """Run one crun verb; its stdout (when not redirected by ``fds``)."""
        log_path = os.path.join(log_dir, f"crun-{verb}.log")
        try:
            os.unlink(log_path)
        except FileNotFoundError:
            pass
        code, output = self.reaper.run(self._argv(log_path, verb, args), COMMAND_TIMEOUT_S, fds)
        if code != 0:
            raise CrunError(verb, code, _read_log(log_path) or output.decode(errors="replace").strip())
        return output

    def create(self, cid: str, bundle: str, pid_file: str, fds: dict[int, int], console_socket: str | None) -> None:
        args = ["--bundle", bundle, "--pid-file", pid_file]
        if self.no_pivot:
            args.append("--no-pivot")
        if console_socket:
            args += ["--console-socket", console_socket]
        self._run(bundle, "create", [*args, cid], fds)

    def start(self, cid: str, log_dir: str) -> None:
        self._run(log_dir, "start", [cid])

    def exec(self, cid: str, log_dir: str, process_json: str, pid_file: str, fds: dict[int, int],
             console_socket: str | None) -> None:
        args = ["--detach", "--process", process_json, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        self._run(log_dir, "exec", [*args, cid], fds)

    def kill(self, cid: str, log_dir: str, signal: int, all_processes: bool) -> None:
        self._run(log_dir, "kill", [*(["--all"] if all_processes else []), cid, str(signal)])

    def delete(self, cid: str, log_dir: str) -> None:
        self._run(log_dir, "delete", ["--force", cid])

    def pause(self, cid: str, log_dir: str) -> None:
        self._run(log_dir, "pause", [cid])

    def resume(self, cid: str, log_dir: str) -> None:
        self._run(log_dir, "resume", [cid])

    def update(self, cid: str, log_dir: str, resources_json: str) -> None:
        self._run(log_dir, "update", ["--resources", resources_json, cid])

    def state(self, cid: str, log_dir: str) -> bytes:
        return self._run(log_dir, "state", [cid])


def _read_log(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read().strip()[-4000:]
    except OSError:
        return ""
