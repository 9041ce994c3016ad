"""Task events the shim publishes, as typed values (containerd ``api/events/task.proto``).

The topics and their order are the shim v2 compliance table (docs/protocols.md
§2): create, start (before Start returns), exit (init's ``id`` is the
container id), delete, exec-added, exec-started, oom, paused, resumed.  The
publisher (``katapy.shim.publisher``) turns them into protobuf at the edge.
"""
from __future__ import annotations

from dataclasses import dataclass

from katapy.shim.types import Mount, Stdio


@dataclass(frozen=True)
class TaskCreated:
    container_id: str
    bundle: str
    rootfs: tuple[Mount, ...]
    stdio: Stdio
    pid: int
    topic = "/tasks/create"


@dataclass(frozen=True)
class TaskStarted:
    container_id: str
    pid: int
    topic = "/tasks/start"


@dataclass(frozen=True)
class TaskExited:
    container_id: str
    id: str  # the container id for init, the exec id otherwise
    pid: int
    exit_status: int
    exited_at: float
    topic = "/tasks/exit"


@dataclass(frozen=True)
class TaskDeleted:
    container_id: str
    id: str
    pid: int
    exit_status: int
    exited_at: float
    topic = "/tasks/delete"


@dataclass(frozen=True)
class ExecAdded:
    container_id: str
    exec_id: str
    topic = "/tasks/exec-added"


@dataclass(frozen=True)
class ExecStarted:
    container_id: str
    exec_id: str
    pid: int
    topic = "/tasks/exec-started"


@dataclass(frozen=True)
class TaskOOM:
    container_id: str
    topic = "/tasks/oom"


@dataclass(frozen=True)
class TaskPaused:
    container_id: str
    topic = "/tasks/paused"


@dataclass(frozen=True)
class TaskResumed:
    container_id: str
    topic = "/tasks/resumed"


TaskEvent = (
    TaskCreated | TaskStarted | TaskExited | TaskDeleted | ExecAdded | ExecStarted | TaskOOM | TaskPaused | TaskResumed
)
