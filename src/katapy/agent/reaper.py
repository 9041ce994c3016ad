"""Child processes: spawning, and one thread that reaps every child.

The agent is PID 1 in the guest (or a child subreaper on the host,
prctl(2) PR_SET_CHILD_SUBREAPER), so container processes whose crun parent
exits are re-parented to it and it must collect every zombie.  A single
thread blocks in ``waitpid(-1)``; everything that wants a child's exit
status registers interest with :meth:`Reaper.wait` instead of calling
waitpid itself (which would race the reaper thread).  Exits of pids nobody
registered yet are remembered, because a process can exit before the agent
learns its pid (crun writes the pid file after forking).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from katapy.agent import log

# Exits of unclaimed pids kept at most this many (oldest dropped): orphans
# re-parented to PID 1 nobody will ever ask about.
_UNCLAIMED_MAX = 4096


def exit_code(wait_status: int) -> int:
    """waitpid(2) status as a shell reports it: exit code, or 128 + signal number."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class Reaper:
    """Reaps every child of this process and hands exit statuses to waiters."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._exited: dict[int, int] = {}  # pid -> exit code, not yet claimed
        self._claimed: set[int] = set()
        self._children_hint = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._children_hint.set()

    def _run(self) -> None:
        while not self._stopping:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No children: sleep until a spawn (or a re-parenting we cannot
                # see, hence the timeout) may have given us one.
                self._children_hint.wait(0.5)
                self._children_hint.clear()
                continue
            except InterruptedError:
                continue
            code = exit_code(status)
            with self._cond:
                self._exited[pid] = code
                if pid not in self._claimed and len(self._exited) > _UNCLAIMED_MAX:
                    oldest = next(p for p in self._exited if p not in self._claimed)
                    del self._exited[oldest]
                self._cond.notify_all()
            log.debug("child reaped", pid=pid, status=code)

    def claim(self, pid: int) -> None:
        """Say that someone will :meth:`wait` for ``pid`` (keeps its status from being dropped)."""
        with self._cond:
            self._claimed.add(pid)
        self._children_hint.set()

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """Block until ``pid`` exits; its exit code, or None on timeout. The status stays readable."""
        with self._cond:
            self._claimed.add(pid)
            self._children_hint.set()
            if not self._cond.wait_for(lambda: pid in self._exited, timeout):
                return None
            return self._exited[pid]

    def poll(self, pid: int) -> int | None:
        with self._cond:
            return self._exited.get(pid)

    def forget(self, pid: int) -> None:
        with self._cond:
            self._claimed.discard(pid)
            self._exited.pop(pid, None)

    def spawn(self, argv: Sequence[str], fds: dict[int, int] | None = None, env: dict[str, str] | None = None) -> int:
        """Start ``argv`` with ``fds`` ({child fd: our fd}) as its 0/1/2; the rest closed (O_CLOEXEC)."""
        fds = fds or {}
        actions = []
        null = None
        for target in (0, 1, 2):
            if target not in fds:
                if null is None:
                    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                fds[target] = null
        for target, source in fds.items():
            actions.append((os.POSIX_SPAWN_DUP2, source, target))
        try:
            pid = os.posix_spawn(argv[0], list(argv), env if env is not None else _base_env(), file_actions=actions)
        finally:
            if null is not None:
                os.close(null)
        self.claim(pid)
        return pid

    def run(self, argv: Sequence[str], timeout: float | None = None, fds: dict[int, int] | None = None) -> tuple[int, bytes]:
        """Run ``argv`` to completion; (exit code, its stderr+stdout unless redirected by ``fds``).

        On timeout the process is killed and the exit code is 137.
        """
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        child_fds = {1: write_end, 2: write_end}
        child_fds.update(fds or {})
        try:
            pid = self.spawn(argv, child_fds)
        finally:
            os.close(write_end)
        chunks = []
        try:
            while chunk := os.read(read_end, 65536):
                if sum(map(len, chunks)) < 1 << 20:
                    chunks.append(chunk)
        finally:
            os.close(read_end)
        code = self.wait(pid, timeout)
        if code is None:
            os.kill(pid, 9)
            code = self.wait(pid)
        self.forget(pid)
        return code if code is not None else 137, b"".join(chunks)


def _base_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")}


def set_child_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER, 1): orphaned descendants become our children (not needed as PID 1)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
