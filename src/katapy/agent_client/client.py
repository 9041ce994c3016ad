"""AgentClient: the host's typed, trio-based client of the katapy (Kata-compatible) agent.

Every method converts typed values (katapy.agent_client.types) and OCI JSON
dicts to the agent.proto messages, makes one ttrpc call to
``grpc.AgentService`` or ``grpc.Health``, and converts the answer back.
Agent errors surface as katapy.ttrpc.errors.TtrpcError subclasses.

Usage::

    async with await AgentClient.connect(uds_path, port=1024, timeout=60.0) as agent:
        await agent.create_sandbox("pod", [], "sandbox-id", [])
"""
from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import trio
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from katapy import log
from katapy.agent_client import dial, oci, types
from katapy.pb import agent_pb2, health_pb2, types_pb2
from katapy.ttrpc.client import Client
from katapy.ttrpc.errors import TtrpcError, Unavailable

AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"
DEFAULT_PORT = 1024
PROBE_TIMEOUT_S = 5.0
RETRY_INTERVAL_S = 0.1
READ_CHUNK = 1 << 20

_log = log.get("agent_client")

Dialer = Callable[[], Awaitable[trio.abc.Stream]]


async def _probe(dialer: Dialer, timeout: float) -> trio.abc.Stream:
    """Dial and answer a Health.Check on a throwaway connection, then dial the one to keep."""
    stream = await dialer()
    async with Client(stream) as probe:
        resp = await probe.call(HEALTH_SERVICE, "Check", health_pb2.CheckRequest(),
                                health_pb2.HealthCheckResponse, timeout=timeout)
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            raise Unavailable(f"agent health status {resp.status}")
    return await dialer()


async def _connect(dialer: Dialer, what: str, timeout: float) -> AgentClient:
    last: BaseException | None = None
    deadline = trio.current_time() + timeout
    attempts = 0
    while True:
        attempts += 1
        left = deadline - trio.current_time()
        if left <= 0:
            raise Unavailable(f"agent at {what} not ready after {timeout:.1f}s ({attempts - 1} attempts): {last}")
        try:
            with trio.fail_after(left):
                stream = await _probe(dialer, min(PROBE_TIMEOUT_S, left))
            _log.debug("agent connected", where=what, attempts=attempts)
            return AgentClient(stream)
        except (OSError, TtrpcError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            last = exc
        await trio.sleep(RETRY_INTERVAL_S)


#: the most processes ListProcesses may list (the guest's pid_max is 4M; a container is far smaller)
MAX_LISTED_PROCESSES = 65536


class AgentClient:
    """One ttrpc connection to the agent; use it as ``async with``."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._ttrpc = Client(stream)

    @classmethod
    async def connect(cls, uds_path: str | os.PathLike[str], port: int = DEFAULT_PORT,
                      timeout: float = 60.0) -> AgentClient:
        """Dial the agent through the sandbox's hybrid vsock socket, retrying until it is healthy."""
        return await _connect(lambda: dial.dial_hybrid_vsock(uds_path, port), f"{uds_path}:{port}", timeout)

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], timeout: float = 60.0) -> AgentClient:
        """Dial an agent serving a plain unix socket (``--listen unix:PATH``)."""
        return await _connect(lambda: dial.dial_unix(path), os.fspath(path), timeout)

    async def __aenter__(self) -> AgentClient:
        await self._ttrpc.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._ttrpc.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        await self._ttrpc.aclose()

    async def _call(self, method: str, req: Message, resp_cls: type[Message] = empty_pb2.Empty,
                    timeout: float | None = None, service: str = AGENT_SERVICE) -> Any:
        return await self._ttrpc.call(service, method, req, resp_cls, timeout=timeout)

    # --- health ---------------------------------------------------------------------
    async def health_check(self, timeout: float | None = None) -> bool:
        resp = await self._call("Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse, timeout,
                                HEALTH_SERVICE)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    async def version(self) -> str:
        resp = await self._call("Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse,
                                service=HEALTH_SERVICE)
        return str(resp.agent_version)

    # --- sandbox --------------------------------------------------------------------
    async def create_sandbox(self, hostname: str, dns: list[str], sandbox_id: str,
                             storages: list[types.Storage]) -> None:
        await self._call("CreateSandbox", agent_pb2.CreateSandboxRequest(
            hostname=hostname, dns=dns, sandbox_id=sandbox_id, storages=[_storage_pb(s) for s in storages]))

    async def destroy_sandbox(self) -> None:
        await self._call("DestroySandbox", agent_pb2.DestroySandboxRequest())

    # --- containers -------------------------------------------------------------------
    async def create_container(self, container_id: str, exec_id: str, oci_spec: dict[str, Any],
                               storages: list[types.Storage] | None = None,
                               devices: list[types.Device] | None = None) -> None:
        spec, dropped = oci.spec_from_json(oci_spec)
        if dropped:
            _log.warning("OCI keys the agent protocol cannot carry were dropped", cid=container_id, keys=dropped)
        await self._call("CreateContainer", agent_pb2.CreateContainerRequest(
            container_id=container_id, exec_id=exec_id, OCI=spec,
            storages=[_storage_pb(s) for s in storages or []],
            devices=[agent_pb2.Device(id=d.id, type=d.type, vm_path=d.vm_path, container_path=d.container_path,
                                      options=d.options) for d in devices or []]))

    async def start_container(self, container_id: str) -> None:
        await self._call("StartContainer", agent_pb2.StartContainerRequest(container_id=container_id))

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> None:
        proc, dropped = oci.process_from_json(process)
        if dropped:
            _log.warning("OCI process keys dropped", cid=container_id, exec_id=exec_id, keys=dropped)
        await self._call("ExecProcess", agent_pb2.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process=proc))

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        await self._call("SignalProcess", agent_pb2.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal))

    async def wait_process(self, container_id: str, exec_id: str, timeout: float | None = None) -> int:
        resp = await self._call("WaitProcess", agent_pb2.WaitProcessRequest(
            container_id=container_id, exec_id=exec_id), agent_pb2.WaitProcessResponse, timeout)
        return int(resp.status)

    async def remove_container(self, container_id: str, timeout_s: int = 0) -> None:
        await self._call("RemoveContainer", agent_pb2.RemoveContainerRequest(
            container_id=container_id, timeout=timeout_s))

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        msg, dropped = oci.resources_from_json(resources)
        if dropped:
            _log.warning("OCI resource keys dropped", cid=container_id, keys=dropped)
        await self._call("UpdateContainer", agent_pb2.UpdateContainerRequest(
            container_id=container_id, resources=msg))

    async def list_processes(self, container_id: str) -> list[types.GuestProcess]:
        """The container's processes in the guest (ListProcesses, format "katapy"); the guest's answer is
        checked (a JSON list of at most MAX_LISTED_PROCESSES {pid, exec_id}) and refused as ValueError."""
        import json

        resp = await self._call("ListProcesses", agent_pb2.ListProcessesRequest(
            container_id=container_id, format="katapy"), agent_pb2.ListProcessesResponse)
        try:
            rows = json.loads(resp.process_list)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"ListProcesses: the guest's answer is not JSON: {exc}") from None
        if not isinstance(rows, list) or len(rows) > MAX_LISTED_PROCESSES:
            raise ValueError(f"ListProcesses: want a list of at most {MAX_LISTED_PROCESSES} processes")
        out = []
        for r in rows:
            pid, exec_id = (r.get("pid"), r.get("exec_id")) if isinstance(r, dict) else (None, None)
            if not (type(pid) is int and 0 < pid < 1 << 31) or not (exec_id is None or isinstance(exec_id, str)):
                raise ValueError(f"ListProcesses: bad process entry {str(r)[:100]!r}")
            out.append(types.GuestProcess(pid, exec_id))
        return out

    async def stats_container(self, container_id: str) -> types.ContainerStats:
        resp = await self._call("StatsContainer", agent_pb2.StatsContainerRequest(container_id=container_id),
                                agent_pb2.StatsContainerResponse)
        s = resp.cgroup_stats
        cpu, mem = s.cpu_stats, s.memory_stats
        return types.ContainerStats(
            cpu=types.CpuStats(cpu.cpu_usage.total_usage, list(cpu.cpu_usage.percpu_usage),
                               cpu.cpu_usage.usage_in_kernelmode, cpu.cpu_usage.usage_in_usermode,
                               cpu.throttling_data.periods, cpu.throttling_data.throttled_periods,
                               cpu.throttling_data.throttled_time),
            memory=types.MemoryStats(mem.usage.usage, mem.usage.max_usage, mem.usage.failcnt, mem.usage.limit,
                                     mem.cache, mem.swap_usage.usage, mem.swap_usage.limit, dict(mem.stats)),
            pids_current=s.pids_stats.current, pids_limit=s.pids_stats.limit)

    async def pause_container(self, container_id: str) -> None:
        await self._call("PauseContainer", agent_pb2.PauseContainerRequest(container_id=container_id))

    async def resume_container(self, container_id: str) -> None:
        await self._call("ResumeContainer", agent_pb2.ResumeContainerRequest(container_id=container_id))

    async def get_oom_event(self, timeout: float | None = None) -> str:
        resp = await self._call("GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent, timeout)
        return str(resp.container_id)

    # --- stdio ------------------------------------------------------------------------
    async def read_stdout(self, container_id: str, exec_id: str, max_len: int = READ_CHUNK) -> bytes:
        return await self._read("ReadStdout", container_id, exec_id, max_len)

    async def read_stderr(self, container_id: str, exec_id: str, max_len: int = READ_CHUNK) -> bytes:
        return await self._read("ReadStderr", container_id, exec_id, max_len)

    async def _read(self, method: str, container_id: str, exec_id: str, max_len: int) -> bytes:
        resp = await self._call(method, agent_pb2.ReadStreamRequest(
            container_id=container_id, exec_id=exec_id, len=max_len), agent_pb2.ReadStreamResponse)
        return bytes(resp.data)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        resp = await self._call("WriteStdin", agent_pb2.WriteStreamRequest(
            container_id=container_id, exec_id=exec_id, data=data), agent_pb2.WriteStreamResponse)
        return int(resp.len)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        await self._call("CloseStdin", agent_pb2.CloseStdinRequest(container_id=container_id, exec_id=exec_id))

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        await self._call("TtyWinResize", agent_pb2.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, row=rows, column=cols))

    # --- network ----------------------------------------------------------------------
    async def update_interface(self, interface: types.Interface) -> types.Interface:
        resp = await self._call("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
            interface=_interface_pb(interface)), types_pb2.Interface)
        return _interface(resp)

    async def update_routes(self, routes: list[types.Route]) -> list[types.Route]:
        resp = await self._call("UpdateRoutes", agent_pb2.UpdateRoutesRequest(
            routes=agent_pb2.Routes(Routes=[_route_pb(r) for r in routes])), agent_pb2.Routes)
        return [_route(r) for r in resp.Routes]

    async def list_interfaces(self) -> list[types.Interface]:
        resp = await self._call("ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces)
        return [_interface(i) for i in resp.Interfaces]

    async def list_routes(self) -> list[types.Route]:
        resp = await self._call("ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes)
        return [_route(r) for r in resp.Routes]

    # --- guest resources ----------------------------------------------------------------
    async def online_cpu_mem(self, nb_cpus: int, wait: bool = True, cpu_only: bool = False) -> None:
        await self._call("OnlineCPUMem", agent_pb2.OnlineCPUMemRequest(nb_cpus=nb_cpus, wait=wait,
                                                                       cpu_only=cpu_only))

    async def set_online_cpus(self, online: int, timeout: float | None = None) -> types.OnlineCpus:
        """Make exactly ``online`` guest CPUs online (katapy's SetOnlineCPUs); the guest's count after."""
        resp = await self._call("SetOnlineCPUs", agent_pb2.SetOnlineCPUsRequest(online=online),
                                agent_pb2.OnlineCPUsResponse, timeout=timeout)
        return types.OnlineCpus(resp.online, resp.present, tuple(resp.online_ids))

    async def get_metrics(self, timeout: float | None = None) -> str:
        """The agent's and the guest's metrics, Prometheus text format (Kata's GetMetrics); untrusted text."""
        resp = await self._call("GetMetrics", agent_pb2.GetMetricsRequest(), agent_pb2.Metrics, timeout=timeout)
        return str(resp.metrics)

    async def guest_details(self) -> types.GuestDetails:
        resp = await self._call("GetGuestDetails", agent_pb2.GuestDetailsRequest(
            mem_block_size=True, mem_hotplug_probe=True), agent_pb2.GuestDetailsResponse)
        d = resp.agent_details
        return types.GuestDetails(resp.mem_block_size_bytes, resp.support_mem_hotplug_probe, d.version,
                                  d.init_daemon, list(d.storage_handlers), list(d.device_handlers))


def _storage_pb(s: types.Storage) -> agent_pb2.Storage:
    return agent_pb2.Storage(driver=s.driver, source=s.source, fstype=s.fstype, mount_point=s.mount_point,
                             options=s.options, driver_options=s.driver_options)


def _interface_pb(i: types.Interface) -> types_pb2.Interface:
    return types_pb2.Interface(
        name=i.name, hwAddr=i.hw_addr, mtu=i.mtu, device=i.device, type=i.type, raw_flags=i.raw_flags,
        IPAddresses=[types_pb2.IPAddress(family=a.family, address=a.address, mask=a.mask)
                     for a in i.ip_addresses])


def _interface(i: types_pb2.Interface) -> types.Interface:
    return types.Interface(name=i.name, hw_addr=i.hwAddr, mtu=i.mtu, device=i.device, type=i.type,
                           raw_flags=i.raw_flags,
                           ip_addresses=[types.IPAddress(a.address, a.mask, a.family) for a in i.IPAddresses])


def _route_pb(r: types.Route) -> types_pb2.Route:
    return types_pb2.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope,
                           family=r.family, flags=r.flags, mtu=r.mtu)


def _route(r: types_pb2.Route) -> types.Route:
    return types.Route(r.dest, r.gateway, r.device, r.source, r.scope, r.family, r.flags, r.mtu)
