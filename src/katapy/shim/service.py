"""The containerd Task service (``containerd.task.v2.Task``, docs/protocols.md §2) over ttrpc.

Conversion only: each RPC's protobuf request becomes a ``katapy.shim.types``
request for the dispatcher, and the katapy response becomes the protobuf
reply.  Errors leave as ttrpc statuses containerd maps back to errdefs.
JSON Anys (exec Process, update LinuxResources) are decoded here; the
runtime options Any must be ``runtimeoptions.v1.Options`` (or absent).
"""
from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2

from katapy import log
from katapy.pb import cgroups_v2_metrics_pb2 as v2m
from katapy.pb import containerd_shim_pb2 as pb
from katapy.pb import containerd_task_status_pb2 as status_pb
from katapy.pb import runtimeoptions_pb2
from katapy.shim import errors as shim_errors
from katapy.shim import types as t
from katapy.shim.dispatcher import Dispatcher
from katapy.shim.publisher import timestamp
from katapy.ttrpc import errors as terr

SERVICE = "containerd.task.v2.Task"
OPTIONS_TYPE_URLS = ("runtimeoptions.v1.Options", "type.googleapis.com/runtimeoptions.v1.Options")
V2_METRICS_TYPE_URL = "io.containerd.cgroups.v2.Metrics"

_ERRORS: dict[type[shim_errors.ShimError], type[terr.TtrpcError]] = {
    shim_errors.NotFound: terr.NotFound,
    shim_errors.InvalidArgument: terr.InvalidArgument,
    shim_errors.AlreadyExists: terr.AlreadyExists,
    shim_errors.FailedPrecondition: terr.FailedPrecondition,
    shim_errors.Unimplemented: terr.Unimplemented,
    shim_errors.Unavailable: terr.Unavailable,
}


def to_ttrpc_error(exc: BaseException) -> terr.TtrpcError:
    if isinstance(exc, terr.TtrpcError):
        return exc
    for cls, mapped in _ERRORS.items():
        if isinstance(exc, cls):
            return mapped(str(exc))
    return terr.Unknown(f"{type(exc).__name__}: {exc}")


# -- protobuf -> katapy ------------------------------------------------------


def _stdio(stdin: str, stdout: str, stderr: str, terminal: bool) -> t.Stdio:
    return t.Stdio(stdin=stdin, stdout=stdout, stderr=stderr, terminal=terminal)


def runtime_options(opts: any_pb2.Any) -> t.RuntimeOptions | None:
    """CreateTaskRequest.options: absent, or runtimeoptions.v1.Options; anything else is refused."""
    if not opts.type_url and not opts.value:
        return None
    if opts.type_url not in OPTIONS_TYPE_URLS:
        raise shim_errors.InvalidArgument(
            f"unknown runtime options type {opts.type_url!r}: katapy accepts only runtimeoptions.v1.Options "
            f"(ConfigPath)")
    msg = runtimeoptions_pb2.Options()
    try:
        msg.ParseFromString(opts.value)
    except Exception as exc:
        raise shim_errors.InvalidArgument(f"runtime options: cannot decode runtimeoptions.v1.Options: {exc}") from None
    return t.RuntimeOptions(config_path=msg.config_path)


def json_any(value: any_pb2.Any, what: str) -> dict[str, Any]:
    """A JSON-encoded Any (containerd typeurl's fallback for non-proto types) as a dict."""
    try:
        decoded = json.loads(value.value or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise shim_errors.InvalidArgument(f"{what} ({value.type_url}): invalid JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise shim_errors.InvalidArgument(f"{what} ({value.type_url}): expected a JSON object")
    return decoded


def create_task(r: pb.CreateTaskRequest) -> t.CreateTask:
    if not r.id:
        raise shim_errors.InvalidArgument("create: container id is empty")
    if not r.bundle:
        raise shim_errors.InvalidArgument(f"create {r.id}: bundle path is empty")
    mounts = tuple(t.Mount(m.type, m.source, m.target, tuple(m.options)) for m in r.rootfs)
    return t.CreateTask(id=r.id, bundle=Path(r.bundle), rootfs=mounts,
                        stdio=_stdio(r.stdin, r.stdout, r.stderr, r.terminal),
                        options=runtime_options(r.options), checkpoint=r.checkpoint)


# -- katapy -> protobuf ------------------------------------------------------


def metrics_v2(s: t.Stats) -> any_pb2.Any:
    m = v2m.Metrics(
        pids=v2m.PidsStat(current=s.pids_current, limit=s.pids_limit),
        cpu=v2m.CPUStat(usage_usec=s.cpu_usage_usec, user_usec=s.cpu_user_usec, system_usec=s.cpu_system_usec),
        memory=v2m.MemoryStat(usage=s.memory_usage, usage_limit=s.memory_limit, max_usage=s.memory_max_usage,
                              **{k: v for k, v in s.memory_stat.items() if k in _V2_MEMORY_FIELDS}),
    )
    return any_pb2.Any(type_url=V2_METRICS_TYPE_URL, value=m.SerializeToString())


_V2_MEMORY_FIELDS = {f.name for f in v2m.MemoryStat.DESCRIPTOR.fields} - {"usage", "usage_limit", "max_usage"}


def state_response(s: t.ProcessState) -> pb.StateResponse:
    return pb.StateResponse(id=s.id, exec_id=s.exec_id, bundle=s.bundle, pid=s.pid,
                            status=status_pb.Status.Value(s.status.name), stdin=s.stdio.stdin,
                            stdout=s.stdio.stdout, stderr=s.stdio.stderr, terminal=s.stdio.terminal,
                            exit_status=s.exit_status, exited_at=timestamp(s.exited_at))


class TaskService:
    """Registers the 17 Task methods on a katapy.ttrpc Server."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        from katapy.metrics.requests import RequestStats

        self.dispatcher = dispatcher
        self._log = log.get("shim.service")
        self.requests = RequestStats("katapy_shim_task", "Task API requests containerd sent the shim")

    def methods(self) -> dict[str, tuple[type, Callable[[Any, Any], Awaitable[Any]]]]:
        return {
            "Create": (pb.CreateTaskRequest, self.create),
            "Start": (pb.StartRequest, self.start),
            "Delete": (pb.DeleteRequest, self.delete),
            "Exec": (pb.ExecProcessRequest, self.exec),
            "State": (pb.StateRequest, self.state),
            "Pids": (pb.PidsRequest, self.pids),
            "Pause": (pb.PauseRequest, self.pause),
            "Resume": (pb.ResumeRequest, self.resume),
            "Checkpoint": (pb.CheckpointTaskRequest, self.checkpoint),
            "Kill": (pb.KillRequest, self.kill),
            "ResizePty": (pb.ResizePtyRequest, self.resize_pty),
            "CloseIO": (pb.CloseIORequest, self.close_io),
            "Update": (pb.UpdateTaskRequest, self.update),
            "Wait": (pb.WaitRequest, self.wait),
            "Stats": (pb.StatsRequest, self.stats),
            "Connect": (pb.ConnectRequest, self.connect),
            "Shutdown": (pb.ShutdownRequest, self.shutdown),
        }

    def register(self, server: Any) -> None:
        server.register(SERVICE, self.methods())

    async def _call(self, name: str, make: Callable[[], t.TaskRequest]) -> t.TaskResponse:
        t0 = time.monotonic()
        try:
            req = make()
            res = await self.dispatcher.handle(req)
        except Exception as exc:
            self.requests.observe(name, False, time.monotonic() - t0)
            err = to_ttrpc_error(exc)
            level = "error" if err.code not in (terr.Code.NOT_FOUND,) else "info"
            getattr(self._log, level)("task request failed", method=name, code=err.code_name, error=err.message)
            raise err from exc
        self.requests.observe(name, True, time.monotonic() - t0)
        return res

    async def create(self, r: pb.CreateTaskRequest, ctx: Any) -> pb.CreateTaskResponse:
        res = await self._call("Create", lambda: create_task(r))
        assert isinstance(res, t.Pid)
        return pb.CreateTaskResponse(pid=res.pid)

    async def start(self, r: pb.StartRequest, ctx: Any) -> pb.StartResponse:
        res = await self._call("Start", lambda: t.StartTask(r.id, r.exec_id))
        assert isinstance(res, t.Pid)
        return pb.StartResponse(pid=res.pid)

    async def delete(self, r: pb.DeleteRequest, ctx: Any) -> pb.DeleteResponse:
        res = await self._call("Delete", lambda: t.DeleteTask(r.id, r.exec_id))
        assert isinstance(res, t.ExitInfo)
        return pb.DeleteResponse(pid=res.pid, exit_status=res.exit_status, exited_at=timestamp(res.exited_at))

    async def exec(self, r: pb.ExecProcessRequest, ctx: Any) -> empty_pb2.Empty:
        await self._call("Exec", lambda: t.ExecTask(r.id, r.exec_id, _stdio(r.stdin, r.stdout, r.stderr, r.terminal),
                                                    json_any(r.spec, f"exec {r.exec_id} process spec")))
        return empty_pb2.Empty()

    async def state(self, r: pb.StateRequest, ctx: Any) -> pb.StateResponse:
        res = await self._call("State", lambda: t.QueryState(r.id, r.exec_id))
        assert isinstance(res, t.ProcessState)
        return state_response(res)

    async def pids(self, r: pb.PidsRequest, ctx: Any) -> pb.PidsResponse:
        res = await self._call("Pids", lambda: t.QueryPids(r.id))
        assert isinstance(res, t.ProcessList)
        return pb.PidsResponse(processes=[status_pb.ProcessInfo(pid=p.pid) for p in res.processes])

    async def pause(self, r: pb.PauseRequest, ctx: Any) -> empty_pb2.Empty:
        await self._call("Pause", lambda: t.PauseTask(r.id))
        return empty_pb2.Empty()

    async def resume(self, r: pb.ResumeRequest, ctx: Any) -> empty_pb2.Empty:
        await self._call("Resume", lambda: t.ResumeTask(r.id))
        return empty_pb2.Empty()

    async def checkpoint(self, r: pb.CheckpointTaskRequest, ctx: Any) -> empty_pb2.Empty:
        await self._call("Checkpoint", lambda: t.CheckpointTask(r.id, r.path))
        return empty_pb2.Empty()

    async def kill(self, r: pb.KillRequest, ctx: Any) -> empty_pb2.Empty:
        await self._call("Kill", lambda: t.KillProcess(r.id, r.exec_id, r.signal, r.all))
        return empty_pb2.Empty()

    async def resize_pty(self, r: pb.ResizePtyRequest, ctx: Any) -> empty_pb2.Empty:
        await self._call("ResizePty", lambda: t.ResizePty(r.id, r.exec_id, r.width, r.height))
        return empty_pb2.Empty()

    async def close_io(self, r: pb.CloseIORequest, ctx: Any) -> empty_pb2.Empty:
        await self._call("CloseIO", lambda: t.CloseIO(r.id, r.exec_id, r.stdin))
        return empty_pb2.Empty()

    async def update(self, r: pb.UpdateTaskRequest, ctx: Any) -> empty_pb2.Empty:
        await self._call("Update", lambda: t.UpdateTask(r.id, json_any(r.resources, "update resources"),
                                                        dict(r.annotations)))
        return empty_pb2.Empty()

    async def wait(self, r: pb.WaitRequest, ctx: Any) -> pb.WaitResponse:
        res = await self._call("Wait", lambda: t.WaitProcess(r.id, r.exec_id))
        assert isinstance(res, t.ExitInfo)
        return pb.WaitResponse(exit_status=res.exit_status, exited_at=timestamp(res.exited_at))

    async def stats(self, r: pb.StatsRequest, ctx: Any) -> pb.StatsResponse:
        res = await self._call("Stats", lambda: t.QueryStats(r.id))
        assert isinstance(res, t.Stats)
        return pb.StatsResponse(stats=metrics_v2(res))

    async def connect(self, r: pb.ConnectRequest, ctx: Any) -> pb.ConnectResponse:
        res = await self._call("Connect", lambda: t.ConnectShim(r.id))
        assert isinstance(res, t.ConnectInfo)
        return pb.ConnectResponse(shim_pid=res.shim_pid, task_pid=res.task_pid, version=res.version)

    async def shutdown(self, r: pb.ShutdownRequest, ctx: Any) -> empty_pb2.Empty:
        await self._call("Shutdown", lambda: t.ShutdownShim(r.id, r.now))
        return empty_pb2.Empty()
