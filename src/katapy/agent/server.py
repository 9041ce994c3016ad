"""The agent's ttrpc services: grpc.Health and grpc.AgentService (Kata agent API).

This module is the protobuf edge of the agent: each handler converts its
request into plain values, calls the sandbox/container layer, and converts the
answer back.  Errors are katapy.ttrpc.errors exceptions (NotFound for an
unknown container or process, InvalidArgument for a bad spec or id, ...); an
unexpected exception becomes UNKNOWN with its text; the agent never dies on a
request.
"""
from __future__ import annotations

import time
from typing import Any

from google.protobuf import empty_pb2

from katapy.agent import VERSION, log, oci, storage
from katapy.agent.container import Containers
from katapy.agent.sandbox import Sandbox
from katapy.pb import agent_pb2, health_pb2, types_pb2
from katapy.agent.stdio import StreamClosed
from katapy.protocol import types
from katapy.ttrpc.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, TtrpcError, Unknown

AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"
MAX_READ = 1 << 20  # bytes per ReadStdout/ReadStderr answer (ttrpc frames max 4 MiB)
GRPC_VERSION = "katapy-ttrpc"

_EMPTY = empty_pb2.Empty


def _storage(s: Any) -> types.Storage:
    return types.Storage(s.driver, s.source, s.fstype, s.mount_point, list(s.options), list(s.driver_options))


def _timeout(ctx: Any) -> float | None:
    deadline = getattr(ctx, "deadline", None)
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class AgentServer:
    """Handlers for both services, bound to one :class:`Sandbox`."""

    def __init__(self, sandbox: Sandbox, init_daemon: bool) -> None:
        self.sandbox = sandbox
        self.containers: Containers = sandbox.containers
        self.init_daemon = init_daemon

    def register(self, server: Any) -> None:
        a = agent_pb2
        server.register(HEALTH_SERVICE, {
            "Check": (health_pb2.CheckRequest, self.check),
            "Version": (health_pb2.CheckRequest, self.version),
        })
        methods = {
            "CreateSandbox": (a.CreateSandboxRequest, self.create_sandbox),
            "DestroySandbox": (a.DestroySandboxRequest, self.destroy_sandbox),
            "CreateContainer": (a.CreateContainerRequest, self.create_container),
            "StartContainer": (a.StartContainerRequest, self.start_container),
            "RemoveContainer": (a.RemoveContainerRequest, self.remove_container),
            "ExecProcess": (a.ExecProcessRequest, self.exec_process),
            "SignalProcess": (a.SignalProcessRequest, self.signal_process),
            "WaitProcess": (a.WaitProcessRequest, self.wait_process),
            "UpdateContainer": (a.UpdateContainerRequest, self.update_container),
            "StatsContainer": (a.StatsContainerRequest, self.stats_container),
            "ListProcesses": (a.ListProcessesRequest, self.list_processes),
            "PauseContainer": (a.PauseContainerRequest, self.pause_container),
            "ResumeContainer": (a.ResumeContainerRequest, self.resume_container),
            "WriteStdin": (a.WriteStreamRequest, self.write_stdin),
            "ReadStdout": (a.ReadStreamRequest, self.read_stdout),
            "ReadStderr": (a.ReadStreamRequest, self.read_stderr),
            "CloseStdin": (a.CloseStdinRequest, self.close_stdin),
            "TtyWinResize": (a.TtyWinResizeRequest, self.tty_win_resize),
            "UpdateInterface": (a.UpdateInterfaceRequest, self.update_interface),
            "UpdateRoutes": (a.UpdateRoutesRequest, self.update_routes),
            "ListInterfaces": (a.ListInterfacesRequest, self.list_interfaces),
            "ListRoutes": (a.ListRoutesRequest, self.list_routes),
            "OnlineCPUMem": (a.OnlineCPUMemRequest, self.online_cpu_mem),
            "SetOnlineCPUs": (a.SetOnlineCPUsRequest, self.set_online_cpus),
            "GetGuestDetails": (a.GuestDetailsRequest, self.guest_details),
            "GetOOMEvent": (a.GetOOMEventRequest, self.get_oom_event),
            "GetMetrics": (a.GetMetricsRequest, self.get_metrics),
        }
        server.register(AGENT_SERVICE, {name: (cls, _guarded(fn)) for name, (cls, fn) in methods.items()})

    # --- grpc.Health ------------------------------------------------------------
    def check(self, req: Any, ctx: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def version(self, req: Any, ctx: Any) -> Any:
        return health_pb2.VersionCheckResponse(grpc_version=GRPC_VERSION, agent_version=VERSION)

    # --- sandbox -------------------------------------------------------------------
    def create_sandbox(self, req: Any, ctx: Any) -> Any:
        self.sandbox.create(req.sandbox_id, req.hostname, list(req.dns), [_storage(s) for s in req.storages])
        return _EMPTY()

    def destroy_sandbox(self, req: Any, ctx: Any) -> Any:
        self.sandbox.destroy()
        return _EMPTY()

    # --- containers ------------------------------------------------------------------
    def create_container(self, req: Any, ctx: Any) -> Any:
        if not req.HasField("OCI"):
            raise InvalidArgument("CreateContainer without an OCI spec")
        try:
            config = oci.spec_to_config(req.OCI)
        except oci.SpecError as exc:
            raise InvalidArgument(f"container {req.container_id}: {exc}") from None
        if req.devices:
            from katapy.agent import devices

            # hot-plugged disks: the spec gets the guest's device numbers before crun sees it
            devices.apply(config, [devices.DeviceRequest(d.id, d.type, d.vm_path, d.container_path, list(d.options))
                                   for d in req.devices])
        mounted = []
        try:
            for s in req.storages:
                st = _storage(s)
                storage.mount_storage(st)
                mounted.append(st.mount_point)
            self.containers.create(req.container_id, req.exec_id, config)
        except BaseException:
            for target in reversed(mounted):
                storage.umount(target)
            raise
        self.sandbox.note_container(req.container_id)
        return _EMPTY()

    def start_container(self, req: Any, ctx: Any) -> Any:
        self.containers.start(req.container_id)
        return _EMPTY()

    def remove_container(self, req: Any, ctx: Any) -> Any:
        self.containers.remove(req.container_id, req.timeout)
        return _EMPTY()

    def exec_process(self, req: Any, ctx: Any) -> Any:
        if not req.HasField("process"):
            raise InvalidArgument("ExecProcess without a process")
        try:
            process = oci.process_to_json(req.process)
        except oci.SpecError as exc:
            raise InvalidArgument(f"exec {req.exec_id}: {exc}") from None
        self.containers.exec(req.container_id, req.exec_id, process)
        return _EMPTY()

    def signal_process(self, req: Any, ctx: Any) -> Any:
        self.containers.signal(req.container_id, req.exec_id, req.signal)
        return _EMPTY()

    def wait_process(self, req: Any, ctx: Any) -> Any:
        code = self.containers.wait(req.container_id, req.exec_id, getattr(ctx, "deadline", None))
        return agent_pb2.WaitProcessResponse(status=code)

    def update_container(self, req: Any, ctx: Any) -> Any:
        self.containers.update(req.container_id, oci.message_to_json(req.resources))
        return _EMPTY()

    def stats_container(self, req: Any, ctx: Any) -> Any:
        s = self.containers.stats(req.container_id)
        a = agent_pb2
        stats = a.CgroupStats(
            cpu_stats=a.CpuStats(
                cpu_usage=a.CpuUsage(total_usage=s.cpu_total_ns, percpu_usage=s.cpu_percpu_ns,
                                     usage_in_kernelmode=s.cpu_kernel_ns, usage_in_usermode=s.cpu_user_ns),
                throttling_data=a.ThrottlingData(periods=s.throttle_periods, throttled_periods=s.throttled_periods,
                                                 throttled_time=s.throttled_time_ns)),
            memory_stats=a.MemoryStats(
                cache=s.mem_cache,
                usage=a.MemoryData(usage=s.mem_usage, max_usage=s.mem_max_usage, failcnt=s.mem_failcnt,
                                   limit=s.mem_limit),
                swap_usage=a.MemoryData(usage=s.swap_usage, limit=s.swap_limit),
                use_hierarchy=True, stats=s.mem_stats),
            pids_stats=a.PidsStats(current=s.pids_current, limit=s.pids_limit),
        )
        return a.StatsContainerResponse(cgroup_stats=stats)

    def list_processes(self, req: Any, ctx: Any) -> Any:
        """Kata's ListProcesses, formats "json" (pids), "katapy" (pid and exec id) and "table"."""
        import json

        rows = self.containers.processes(req.container_id)
        if req.format == "json":
            out = json.dumps([pid for pid, _ in rows]).encode()
        elif req.format == "katapy":
            out = json.dumps([{"pid": pid, "exec_id": exec_id} for pid, exec_id in rows]).encode()
        elif req.format in ("", "table"):
            lines = ["PID EXEC_ID CMD"] + [f"{pid} {'-' if e is None else e or 'init'} {_cmdline(pid)}"
                                           for pid, e in rows]
            out = ("\n".join(lines) + "\n").encode()
        else:
            raise InvalidArgument(f"ListProcesses: unknown format {req.format!r} (json, katapy or table)")
        return agent_pb2.ListProcessesResponse(process_list=out)

    def pause_container(self, req: Any, ctx: Any) -> Any:
        self.containers.pause(req.container_id)
        return _EMPTY()

    def resume_container(self, req: Any, ctx: Any) -> Any:
        self.containers.resume(req.container_id)
        return _EMPTY()

    # --- stdio -------------------------------------------------------------------------
    def _io(self, req: Any) -> Any:
        return self.containers.get(req.container_id).process(req.exec_id).io

    def _read(self, req: Any, stream: str, ctx: Any) -> Any:
        max_len = min(req.len or MAX_READ, MAX_READ)
        data = self._io(req).read(stream, max_len, getattr(ctx, "cancelled", None))
        return agent_pb2.ReadStreamResponse(data=data)

    def read_stdout(self, req: Any, ctx: Any) -> Any:
        return self._read(req, "stdout", ctx)

    def read_stderr(self, req: Any, ctx: Any) -> Any:
        return self._read(req, "stderr", ctx)

    def write_stdin(self, req: Any, ctx: Any) -> Any:
        return agent_pb2.WriteStreamResponse(len=self._io(req).write(req.data))

    def close_stdin(self, req: Any, ctx: Any) -> Any:
        self._io(req).close_stdin()
        return _EMPTY()

    def tty_win_resize(self, req: Any, ctx: Any) -> Any:
        if not (0 < req.row < 65536 and 0 < req.column < 65536):
            raise InvalidArgument(f"invalid window size {req.row}x{req.column}")
        self._io(req).resize(req.row, req.column)
        return _EMPTY()

    # --- network ------------------------------------------------------------------------
    def update_interface(self, req: Any, ctx: Any) -> Any:
        from katapy.agent import network

        i = req.interface
        iface = types.Interface(
            name=i.name, hw_addr=i.hwAddr, mtu=i.mtu, device=i.device, type=i.type, raw_flags=i.raw_flags,
            ip_addresses=[types.IPAddress(a.address, a.mask, a.family) for a in i.IPAddresses])
        return _interface_pb(network.update_interface(iface))

    def update_routes(self, req: Any, ctx: Any) -> Any:
        from katapy.agent import network

        routes = [types.Route(r.dest, r.gateway, r.device, r.source, r.scope, r.family, r.flags, r.mtu)
                  for r in req.routes.Routes]
        return _routes_pb(network.update_routes(routes))

    def list_interfaces(self, req: Any, ctx: Any) -> Any:
        from katapy.agent import network

        return agent_pb2.Interfaces(Interfaces=[_interface_pb(i) for i in network.list_interfaces()])

    def list_routes(self, req: Any, ctx: Any) -> Any:
        from katapy.agent import network

        return _routes_pb(network.list_routes())

    # --- guest resources ------------------------------------------------------------------
    def online_cpu_mem(self, req: Any, ctx: Any) -> Any:
        from katapy.agent import guest

        guest.online_cpus(req.nb_cpus, _timeout(ctx))
        if not req.cpu_only:
            guest.online_memory()
        return _EMPTY()

    def set_online_cpus(self, req: Any, ctx: Any) -> Any:
        from katapy.agent import cpu_online

        after = cpu_online.set_online_cpus(req.online)
        log.info("online CPUs set", requested=req.online, online=after.online, present=after.present)
        return agent_pb2.OnlineCPUsResponse(online=after.online, present=after.present,
                                            online_ids=list(after.online_ids))

    def guest_details(self, req: Any, ctx: Any) -> Any:
        from katapy.agent import guest
        from katapy.agent.devices import HANDLERS

        return agent_pb2.GuestDetailsResponse(
            mem_block_size_bytes=guest.memory_block_size() if req.mem_block_size else 0,
            support_mem_hotplug_probe=guest.has_memory_probe() if req.mem_hotplug_probe else False,
            agent_details=agent_pb2.AgentDetails(
                version=VERSION, init_daemon=self.init_daemon, device_handlers=list(HANDLERS),
                storage_handlers=list(storage.DRIVERS), supports_seccomp=True),
        )

    def get_metrics(self, req: Any, ctx: Any) -> Any:
        from katapy.agent import metrics

        return agent_pb2.Metrics(metrics=metrics.collect())

    def get_oom_event(self, req: Any, ctx: Any) -> Any:
        cid = self.sandbox.next_oom_event(_timeout(ctx), getattr(ctx, "cancelled", None))
        return agent_pb2.OOMEvent(container_id=cid)


def _cmdline(pid: int) -> str:
    """/proc/<pid>/cmdline as one line ("[comm]" for a kernel-less or exited one, as ps shows it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        raw = b""
    if raw:
        return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f"[{f.read().strip()}]"
    except OSError:
        return "?"


def _interface_pb(i: Any) -> Any:
    return types_pb2.Interface(
        name=i.name, hwAddr=i.hw_addr, mtu=i.mtu, device=i.device, type=i.type, raw_flags=i.raw_flags,
        IPAddresses=[types_pb2.IPAddress(family=a.family, address=a.address, mask=a.mask) for a in i.ip_addresses])


def _routes_pb(routes: list[Any]) -> Any:
    return agent_pb2.Routes(Routes=[
        types_pb2.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope,
                        family=r.family, flags=r.flags, mtu=r.mtu) for r in routes])


def _guarded(handler: Any) -> Any:
    """Log failures; turn OSErrors into clear statuses (ENOENT -> NOT_FOUND)."""

    def run(req: Any, ctx: Any) -> Any:
        try:
            return handler(req, ctx)
        except TtrpcError as exc:
            log.info("request failed", method=ctx.method, code=exc.code_name, error=exc.message)
            raise
        except FileNotFoundError as exc:
            log.info("request failed", method=ctx.method, error=exc)
            raise NotFound(str(exc)) from None
        except StreamClosed as exc:
            log.info("request failed", method=ctx.method, error=exc)
            if getattr(ctx, "cancelled", None) is not None and ctx.cancelled.is_set():
                raise Cancelled(str(exc)) from None
            raise FailedPrecondition(str(exc)) from None
        except Exception as exc:
            log.error("request failed", method=ctx.method, error=repr(exc))
            raise Unknown(f"{type(exc).__name__}: {exc}") from None

    run.__name__ = getattr(handler, "__name__", "handler")
    return run
