"""The shim's own request/response types: what the service layer converts the
containerd Task API (``containerd.task.v2``, docs/protocols.md §2) into.

Nothing below the service layer sees protobuf; these dataclasses are the
vocabulary the dispatcher, the runtime handler and the managers share.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TaskStatus(enum.IntEnum):
    """containerd.v1.types.Status (api/types/task/task.proto): same numbers."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


@dataclass(frozen=True)
class Mount:
    """containerd.types.Mount: one of the rootfs mounts containerd hands the shim."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stdio:
    """containerd's stdio for one process: FIFO paths ("" = no stream)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass(frozen=True)
class RuntimeOptions:
    """runtimeoptions.v1.Options as CRI sends it for non-runc runtimes."""

    config_path: str = ""


# -- requests (one per Task RPC) ---------------------------------------------


@dataclass(frozen=True)
class CreateTask:
    id: str
    bundle: Path
    rootfs: tuple[Mount, ...]
    stdio: Stdio
    options: RuntimeOptions | None = None
    checkpoint: str = ""


@dataclass(frozen=True)
class StartTask:
    id: str
    exec_id: str = ""


@dataclass(frozen=True)
class DeleteTask:
    id: str
    exec_id: str = ""


@dataclass(frozen=True)
class ExecTask:
    id: str
    exec_id: str
    stdio: Stdio
    process: dict[str, Any]  # OCI runtime-spec Process (JSON)


@dataclass(frozen=True)
class QueryState:
    id: str
    exec_id: str = ""


@dataclass(frozen=True)
class QueryPids:
    id: str


@dataclass(frozen=True)
class PauseTask:
    id: str


@dataclass(frozen=True)
class ResumeTask:
    id: str


@dataclass(frozen=True)
class CheckpointTask:
    id: str
    path: str = ""


@dataclass(frozen=True)
class KillProcess:
    id: str
    exec_id: str
    signal: int
    all: bool = False


@dataclass(frozen=True)
class ResizePty:
    id: str
    exec_id: str
    width: int
    height: int


@dataclass(frozen=True)
class CloseIO:
    id: str
    exec_id: str
    stdin: bool


@dataclass(frozen=True)
class UpdateTask:
    id: str
    resources: dict[str, Any]  # OCI LinuxResources (JSON)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WaitProcess:
    id: str
    exec_id: str = ""


@dataclass(frozen=True)
class QueryStats:
    id: str


@dataclass(frozen=True)
class ConnectShim:
    id: str


@dataclass(frozen=True)
class ShutdownShim:
    id: str
    now: bool = False


TaskRequest = (
    CreateTask | StartTask | DeleteTask | ExecTask | QueryState | QueryPids | PauseTask | ResumeTask
    | CheckpointTask | KillProcess | ResizePty | CloseIO | UpdateTask | WaitProcess | QueryStats
    | ConnectShim | ShutdownShim
)

# -- responses ---------------------------------------------------------------


@dataclass(frozen=True)
class Pid:
    pid: int


@dataclass(frozen=True)
class ExitInfo:
    pid: int
    exit_status: int
    exited_at: float  # seconds since the epoch; 0.0 = not exited


@dataclass(frozen=True)
class ProcessState:
    id: str
    exec_id: str
    bundle: str
    pid: int
    status: TaskStatus
    stdio: Stdio
    exit_status: int
    exited_at: float


@dataclass(frozen=True)
class ProcessEntry:
    """One row of Pids: the guest pid and the exec id (empty for init)."""

    pid: int
    exec_id: str = ""


@dataclass(frozen=True)
class ProcessList:
    processes: tuple[ProcessEntry, ...]


@dataclass(frozen=True)
class ConnectInfo:
    shim_pid: int
    task_pid: int
    version: str


@dataclass(frozen=True)
class Stats:
    """Guest cgroup v2 numbers for one container (units as in cgroup v2 files)."""

    cpu_usage_usec: int = 0
    cpu_user_usec: int = 0
    cpu_system_usec: int = 0
    memory_usage: int = 0
    memory_limit: int = 0
    memory_max_usage: int = 0
    memory_stat: dict[str, int] = field(default_factory=dict)
    pids_current: int = 0
    pids_limit: int = 0


@dataclass(frozen=True)
class Done:
    """A request that answers google.protobuf.Empty."""


TaskResponse = Pid | ExitInfo | ProcessState | ProcessList | ConnectInfo | Stats | Done
