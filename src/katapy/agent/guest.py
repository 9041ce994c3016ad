"""Guest CPU and memory hotplug state (sysfs ABI: devices-system-cpu, memory-hotplug.rst).

OnlineCPUMem onlines hot-added vCPUs (``/sys/devices/system/cpu/cpuN/online``)
until ``nb_cpus`` more are online, and every offline memory block
(``/sys/devices/system/memory/memoryN/state``).
"""
from __future__ import annotations

import os
import time

from katapy.agent.cpu_online import CpuSysfs
from katapy.ttrpc.errors import DeadlineExceeded, FailedPrecondition

SYS_MEMORY = "/sys/devices/system/memory"
CPU_WAIT_S = 10.0


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


def online_cpus(nb_cpus: int, timeout: float | None, sysfs: CpuSysfs | None = None) -> int:
    """Online up to ``nb_cpus`` offline CPUs, waiting for hot-added ones to appear; how many.

    The CPU files are :class:`katapy.agent.cpu_online.CpuSysfs`'s (SetOnlineCPUs uses the same)."""
    if nb_cpus == 0:
        return 0
    sysfs = sysfs or CpuSysfs()
    done = 0
    deadline = time.monotonic() + (CPU_WAIT_S if timeout is None else min(timeout, CPU_WAIT_S))
    while done < nb_cpus:
        for cpu in [c for c in sysfs.present() if not sysfs.is_online(c)]:
            if done >= nb_cpus:
                break
            try:
                sysfs.write(cpu, True)
                done += 1
            except FailedPrecondition:
                continue  # not up yet (still being hot-added) or refused: retried until the deadline
        if done >= nb_cpus:
            break
        if time.monotonic() > deadline:
            if timeout is not None and timeout <= CPU_WAIT_S:
                raise DeadlineExceeded(f"onlined {done} of {nb_cpus} CPUs")
            raise FailedPrecondition(f"only {done} of {nb_cpus} requested CPUs could be onlined")
        time.sleep(0.05)
    return done


def online_memory() -> int:
    """Online every offline memory block; how many."""
    count = 0
    try:
        names = os.listdir(SYS_MEMORY)
    except OSError:
        return 0
    for name in names:
        state = os.path.join(SYS_MEMORY, name, "state")
        try:
            with open(state) as f:
                offline = f.read().strip() == "offline"
        except OSError:
            continue
        if offline and _write(state, "online"):
            count += 1
    return count


def memory_block_size() -> int:
    try:
        with open(os.path.join(SYS_MEMORY, "block_size_bytes")) as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return 0


def has_memory_probe() -> bool:
    return os.path.exists(os.path.join(SYS_MEMORY, "probe"))
