"""One process the agent started in a container: the init process or an exec'd one."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from katapy.agent.reaper import Reaper
from katapy.agent.stdio import ProcessIO


def read_pid_file(path: str) -> int:
    """The pid crun wrote to ``--pid-file``."""
    with open(path) as f:
        text = f.read().strip()
    pid = int(text)
    if pid <= 1:
        raise ValueError(f"crun wrote an impossible pid {text!r} to {path}")
    return pid


@dataclass
class Process:
    exec_id: str
    io: ProcessIO
    pid: int = 0
    terminal: bool = False
    _reaper: Reaper | None = field(default=None, repr=False)

    def attach(self, reaper: Reaper, pid: int) -> None:
        self._reaper = reaper
        self.pid = pid
        reaper.claim(pid)

    def exit_code(self) -> int | None:
        """The exit code if the process has exited (128 + signal when killed by one)."""
        if self._reaper is None:
            return None
        return self._reaper.poll(self.pid)

    def wait(self, timeout: float | None = None) -> int | None:
        if self._reaper is None:
            raise RuntimeError("process was never started")
        return self._reaper.wait(self.pid, timeout)

    def signal(self, signum: int) -> None:
        """kill(2) the process; ProcessLookupError if it has already exited."""
        if self.pid <= 1 or self.exit_code() is not None:
            raise ProcessLookupError(f"process {self.exec_id} has already exited")
        os.kill(self.pid, signum)

    def release(self) -> None:
        self.io.close()
        if self._reaper is not None and self.pid:
            self._reaper.forget(self.pid)
