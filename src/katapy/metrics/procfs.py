"""One host process's resource use, from procfs (proc(5): /proc/<pid>/stat, status, fd).

Read on every scrape; a process that is gone reads as None, never as an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessStats:
    pid: int
    resident_bytes: int  # VmRSS
    threads: int
    open_fds: int
    cpu_seconds: float  # utime + stime
    start_time_ticks: int  # field 22 of stat: clock ticks after boot


def read(pid: int, proc: str = "/proc") -> ProcessStats | None:
    """The figures of ``pid`` now, or None if it has exited (or is not readable)."""
    base = f"{proc}/{pid}"
    try:
        with open(f"{base}/stat") as f:
            stat = f.read()
        with open(f"{base}/status") as f:
            status = f.read()
        fds = len(os.listdir(f"{base}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) is in parentheses and may hold spaces or ')': split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14, 15
    threads = int(fields[17])  # field 20
    start = int(fields[19])  # field 22
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024  # kB
            break
    return ProcessStats(pid, rss, threads, fds, (utime + stime) / _CLK_TCK, start)
