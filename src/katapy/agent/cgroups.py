"""Reading a container's cgroup: statistics and the OOM-kill counter.

The guest uses the unified hierarchy (cgroup v2, Documentation/admin-guide/
cgroup-v2.rst: cpu.stat, memory.current/max/stat/events, pids.current/max);
a development host may be v1 or hybrid (cgroup-v1/{cpuacct,memory,pids}.rst),
so both are read.  A container's cgroup is found from its init process's
/proc/<pid>/cgroup (proc(5)) when it starts and remembered, because the
process may be gone when stats or OOM counters are asked for later.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

CGROUP_ROOT = "/sys/fs/cgroup"
USER_HZ = 100  # cpuacct.stat unit (sysconf(_SC_CLK_TCK) on Linux)


@dataclass
class CgroupPaths:
    """Where a container's cgroup lives: one v2 directory, or one directory per v1 controller."""

    unified: str | None = None
    v1: dict[str, str] = field(default_factory=dict)

    def controller(self, name: str) -> str | None:
        if self.unified is not None:
            return self.unified
        return self.v1.get(name)


def paths_for_pid(pid: int) -> CgroupPaths:
    """Parse /proc/<pid>/cgroup (``hierarchy-ID:controller-list:path``)."""
    paths = CgroupPaths()
    with open(f"/proc/{pid}/cgroup") as f:
        lines = f.read().splitlines()
    v1_found = False
    unified_rel = None
    for line in lines:
        hid, controllers, rel = line.split(":", 2)
        if hid == "0" and controllers == "":
            unified_rel = rel
            continue
        for controller in controllers.split(","):
            name = controller.removeprefix("name=")
            for candidate in (os.path.join(CGROUP_ROOT, controller), os.path.join(CGROUP_ROOT, name)):
                if os.path.isdir(candidate):
                    paths.v1[name] = os.path.join(candidate, rel.lstrip("/"))
                    v1_found = True
                    break
    if not v1_found and unified_rel is not None:
        paths.unified = os.path.join(CGROUP_ROOT, unified_rel.lstrip("/"))
    return paths


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _read_int(path: str) -> int:
    text = _read(path)
    if text is None or text == "max":
        return 0
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return 0


def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


@dataclass
class Stats:
    """The Kata CgroupStats subset katapy fills (agent.proto CgroupStats)."""

    cpu_total_ns: int = 0
    cpu_percpu_ns: list[int] = field(default_factory=list)
    cpu_kernel_ns: int = 0
    cpu_user_ns: int = 0
    throttle_periods: int = 0
    throttled_periods: int = 0
    throttled_time_ns: int = 0
    mem_usage: int = 0
    mem_max_usage: int = 0
    mem_failcnt: int = 0
    mem_limit: int = 0
    mem_cache: int = 0
    swap_usage: int = 0
    swap_limit: int = 0
    mem_stats: dict[str, int] = field(default_factory=dict)
    pids_current: int = 0
    pids_limit: int = 0


def read_stats(paths: CgroupPaths) -> Stats:
    if paths.unified is not None:
        return _read_v2(paths.unified)
    return _read_v1(paths)


def pids(paths: CgroupPaths) -> list[int]:
    """Every pid in the cgroup and the cgroups below it (``cgroup.procs``, cgroup v2 / v1 ``pids``), sorted."""
    top = paths.unified if paths.unified is not None else paths.controller("pids") or paths.controller("memory")
    if top is None:
        return []
    found: set[int] = set()
    for d, _, _ in os.walk(top):
        text = _read(os.path.join(d, "cgroup.procs")) or ""
        found.update(int(w) for w in text.split() if w.isdigit())
    return sorted(found)


def _read_v2(d: str) -> Stats:
    s = Stats()
    cpu = _read_kv(os.path.join(d, "cpu.stat"))
    s.cpu_total_ns = cpu.get("usage_usec", 0) * 1000
    s.cpu_user_ns = cpu.get("user_usec", 0) * 1000
    s.cpu_kernel_ns = cpu.get("system_usec", 0) * 1000
    s.throttle_periods = cpu.get("nr_periods", 0)
    s.throttled_periods = cpu.get("nr_throttled", 0)
    s.throttled_time_ns = cpu.get("throttled_usec", 0) * 1000
    s.mem_usage = _read_int(os.path.join(d, "memory.current"))
    s.mem_max_usage = _read_int(os.path.join(d, "memory.peak"))
    s.mem_limit = _read_int(os.path.join(d, "memory.max"))
    s.mem_stats = _read_kv(os.path.join(d, "memory.stat"))
    s.mem_cache = s.mem_stats.get("file", 0)
    s.mem_failcnt = _read_kv(os.path.join(d, "memory.events")).get("max", 0)
    s.swap_usage = _read_int(os.path.join(d, "memory.swap.current"))
    s.swap_limit = _read_int(os.path.join(d, "memory.swap.max"))
    s.pids_current = _read_int(os.path.join(d, "pids.current"))
    s.pids_limit = _read_int(os.path.join(d, "pids.max"))
    return s


def _read_v1(paths: CgroupPaths) -> Stats:
    s = Stats()
    cpuacct = paths.controller("cpuacct")
    if cpuacct:
        s.cpu_total_ns = _read_int(os.path.join(cpuacct, "cpuacct.usage"))
        s.cpu_percpu_ns = [int(x) for x in (_read(os.path.join(cpuacct, "cpuacct.usage_percpu")) or "").split()]
        ticks = _read_kv(os.path.join(cpuacct, "cpuacct.stat"))
        s.cpu_user_ns = ticks.get("user", 0) * (1_000_000_000 // USER_HZ)
        s.cpu_kernel_ns = ticks.get("system", 0) * (1_000_000_000 // USER_HZ)
    cpu = paths.controller("cpu")
    if cpu:
        throttle = _read_kv(os.path.join(cpu, "cpu.stat"))
        s.throttle_periods = throttle.get("nr_periods", 0)
        s.throttled_periods = throttle.get("nr_throttled", 0)
        s.throttled_time_ns = throttle.get("throttled_time", 0)
    mem = paths.controller("memory")
    if mem:
        s.mem_usage = _read_int(os.path.join(mem, "memory.usage_in_bytes"))
        s.mem_max_usage = _read_int(os.path.join(mem, "memory.max_usage_in_bytes"))
        s.mem_failcnt = _read_int(os.path.join(mem, "memory.failcnt"))
        s.mem_limit = _read_int(os.path.join(mem, "memory.limit_in_bytes"))
        s.mem_stats = _read_kv(os.path.join(mem, "memory.stat"))
        s.mem_cache = s.mem_stats.get("cache", 0)
        s.swap_usage = _read_int(os.path.join(mem, "memory.memsw.usage_in_bytes"))
        s.swap_limit = _read_int(os.path.join(mem, "memory.memsw.limit_in_bytes"))
    pids = paths.controller("pids")
    if pids:
        s.pids_current = _read_int(os.path.join(pids, "pids.current"))
        s.pids_limit = _read_int(os.path.join(pids, "pids.max"))
    return s


def oom_kill_count(paths: CgroupPaths) -> int | None:
    """The cgroup's OOM-kill counter (v2 memory.events, v1 memory.oom_control ``oom_kill``); None if unreadable."""
    if paths.unified is not None:
        events = _read(os.path.join(paths.unified, "memory.events"))
        name = "oom_kill"
    else:
        mem = paths.v1.get("memory")
        events = _read(os.path.join(mem, "memory.oom_control")) if mem else None
        name = "oom_kill"
    if events is None:
        return None
    for line in events.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            return int(parts[1])
    return None
