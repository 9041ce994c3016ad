"""Typed values of the agent API for the host side (no protobuf outside katapy.agent_client).

Field meanings follow Kata's agent.proto / types.proto messages of the same name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from katapy.protocol.types import IP_FAMILY_V4, IP_FAMILY_V6, Interface, IPAddress, Route, Storage

__all__ = [
    "IP_FAMILY_V4", "IP_FAMILY_V6", "Storage", "Device", "IPAddress", "Interface", "Route",
    "CpuStats", "MemoryStats", "ContainerStats", "GuestDetails",
]


@dataclass(frozen=True)
class Device:
    """agent.proto Device: a guest device to expose in a container."""

    id: str
    type: str
    vm_path: str = ""
    container_path: str = ""
    options: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CpuStats:
    total_usage_ns: int = 0
    percpu_usage_ns: list[int] = field(default_factory=list)
    kernel_ns: int = 0
    user_ns: int = 0
    throttling_periods: int = 0
    throttled_periods: int = 0
    throttled_time_ns: int = 0


@dataclass(frozen=True)
class MemoryStats:
    usage: int = 0
    max_usage: int = 0
    failcnt: int = 0
    limit: int = 0
    cache: int = 0
    swap_usage: int = 0
    swap_limit: int = 0
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerStats:
    """StatsContainerResponse.cgroup_stats, flattened to what katapy fills."""

    cpu: CpuStats
    memory: MemoryStats
    pids_current: int = 0
    pids_limit: int = 0


@dataclass(frozen=True)
class GuestProcess:
    """One process of a container in the guest (ListProcesses): exec_id "" for init, None for a process
    that is neither init nor an exec (a child)."""

    pid: int
    exec_id: str | None


@dataclass(frozen=True)
class OnlineCpus:
    """SetOnlineCPUs' answer: the guest's online CPU count (and ids) out of the CPUs present."""

    online: int
    present: int
    online_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GuestDetails:
    mem_block_size_bytes: int
    support_mem_hotplug_probe: bool
    agent_version: str
    init_daemon: bool
    storage_handlers: list[str] = field(default_factory=list)
    device_handlers: list[str] = field(default_factory=list)
