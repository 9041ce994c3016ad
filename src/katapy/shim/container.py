"""ContainerManager: the containers of one sandbox, their init and exec processes
(Kata runtime-rs ``virt_container::container_manager``).

Each container's rootfs and volumes are prepared on the host (``katapy.resource``)
and the spec handed to the agent says where the guest sees them.  A process
moves CREATED -> RUNNING (<-> PAUSED) -> STOPPED; its exit is recorded only
after its output was drained, then TaskExit is published and waiters wake.
Task pids are the VMM's host pid (as Kata reports them); ``Pids`` lists the
container's processes inside the guest by their guest pids (the agent's
ListProcesses), which Kata's shim does not.
"""
from __future__ import annotations

import copy
import signal as signals
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from katapy import log
from katapy.resource import etc_files, namespaces, rootfs, volumes
from katapy.resource.devices import spec as devspec
from katapy.shim import bundle as bundle_mod
from katapy.shim import events as ev
from katapy.shim import types as t
from katapy.shim.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from katapy.shim.sandbox import SandboxManager
from katapy.shim.stdio import ProcessIO

REMOVE_TIMEOUT_S = 10


@dataclass
class Process:
    container_id: str
    exec_id: str  # "" for init
    stdio: t.Stdio
    spec: dict[str, Any]  # OCI Process
    io: ProcessIO | None = None
    status: t.TaskStatus = t.TaskStatus.CREATED
    guest_pid: int = 0
    exit_status: int = 0
    exited_at: float = 0.0
    exited: trio.Event = field(default_factory=trio.Event)

    @property
    def agent_exec_id(self) -> str:
        """The agent's exec id: the container id for init (as Kata's Go runtime sends it)."""
        return self.exec_id or self.container_id

    def exit_info(self, pid: int) -> t.ExitInfo:
        return t.ExitInfo(pid=pid, exit_status=self.exit_status, exited_at=self.exited_at)


@dataclass
class Container:
    id: str
    bundle: Path
    spec: dict[str, Any]
    rootfs_mounts: tuple[t.Mount, ...]
    init: Process
    volumes: volumes.SharedVolumes | None = None
    execs: dict[str, Process] = field(default_factory=dict)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"exec {exec_id!r} of container {self.id!r} not found")
        return proc


class ContainerManager:
    """All containers of one sandbox.  ``nursery`` runs stdio pumps and waiters."""

    def __init__(self, sandbox: SandboxManager, publish: Callable[[ev.TaskEvent], None],
                 nursery: trio.Nursery) -> None:
        self.sandbox = sandbox
        self.publish = publish
        self.nursery = nursery
        self.containers: dict[str, Container] = {}
        # whether the sandbox (the first, pause) container has its own PID namespace (not a hostPID pod)
        self.sandbox_has_pid_ns: bool | None = None
        self._log = log.get("shim.container", sandbox_id=sandbox.sandbox_id)

    # -- lookup -----------------------------------------------------------------

    def get(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid!r} not found in sandbox {self.sandbox.sandbox_id}")
        return c

    @property
    def task_pid(self) -> int:
        return self.sandbox.vmm_pid

    # -- create / start ---------------------------------------------------------

    async def create(self, req: t.CreateTask, spec: dict[str, Any]) -> int:
        """Prepare resources on the host and create the container in the guest (not started)."""
        if req.id in self.containers:
            raise AlreadyExists(f"container {req.id!r} already exists")
        spec_terminal = bool(spec["process"].get("terminal", False))
        if spec_terminal != req.stdio.terminal:
            raise InvalidArgument(f"config.json process.terminal={spec_terminal} but the task asks "
                                  f"terminal={req.stdio.terminal}")
        shared = self.sandbox.shared_dir
        root = spec.get("root") or {}
        mounts = [rootfs.RootfsMount(m.type, m.source, m.options) for m in req.rootfs]
        try:
            rootfs.check(req.bundle, root.get("path", ""), mounts)
            volumes.validate(spec.get("mounts"))
        except (rootfs.RootfsError, volumes.VolumeError) as exc:
            raise InvalidArgument(f"container {req.id}: {exc}") from None

        t0 = time.monotonic()
        init = Process(req.id, "", req.stdio, spec["process"])
        container = Container(req.id, req.bundle, spec, req.rootfs, init)
        try:
            rfs = rootfs.prepare(shared, req.id, req.bundle, root.get("path", ""), mounts)
            container.volumes = volumes.share(shared, req.id, spec.get("mounts"))
            guest_spec = copy.deepcopy(spec)
            guest_spec["root"] = {"path": rfs.guest_path, "readonly": bool(root.get("readonly", False))}
            guest_spec["mounts"] = container.volumes.spec_mounts + etc_files.add_missing(shared, req.id, spec)
            if self.sandbox_has_pid_ns is None:
                self.sandbox_has_pid_ns = namespaces.has_namespace(spec, "pid")
            try:
                namespaces.amend_for_guest(guest_spec, bundle_mod.is_pod_member(spec), self.sandbox_has_pid_ns,
                                           bundle_mod.sandbox_id(spec, req.id))
            except namespaces.NamespaceError as exc:
                raise InvalidArgument(f"container {req.id}: {exc}") from None
            init.io = ProcessIO(self.sandbox.agent, req.id, req.id, req.stdio)
            init.io.open()
            # before crun creates the container's process: it starts on the vCPUs its limit asks for
            await self.sandbox.resize_for(req.id, _sized_resources(spec))
            # its block devices hot-plugged as virtio-blk; the agent maps them to the guest's disks
            if self.sandbox.config.runtime.privileged_without_host_devices and devspec.is_privileged(spec):
                guest_spec = devspec.without_block_devices(guest_spec)  # not every host disk into the VM
                self._log.info("privileged container: host block devices withheld", container_id=req.id,
                               reason="[runtime] privileged_without_host_devices")
            devices = await self.sandbox.attach_devices(req.id, guest_spec)
            await self.sandbox.agent_request("CreateContainer", self.sandbox.agent.create_container(
                req.id, req.id, guest_spec, [], devices))
        except BaseException:
            with trio.CancelScope(shield=True):
                self._release(container)
                await self.sandbox.detach_devices(req.id)
                await self._give_back_vcpus(req.id)
            raise
        self.containers[req.id] = container
        self.sandbox.record.containers.append(req.id)
        self.sandbox.record.save()
        pid = self.task_pid
        self.publish(ev.TaskCreated(req.id, str(req.bundle), req.rootfs, req.stdio, pid))
        self._log.info("container created", container_id=req.id, create_s=round(time.monotonic() - t0, 3))
        return pid

    async def start(self, cid: str, exec_id: str) -> int:
        c = self.get(cid)
        proc = c.process(exec_id)
        if proc.status != t.TaskStatus.CREATED:
            raise FailedPrecondition(f"process {cid}/{exec_id or 'init'} is {proc.status.name.lower()}, not created")
        agent = self.sandbox.agent
        t0 = time.monotonic()
        if exec_id:
            if c.init.status not in (t.TaskStatus.RUNNING, t.TaskStatus.PAUSED):
                raise FailedPrecondition(f"container {cid} is not running; cannot start exec {exec_id}")
            result = await self.sandbox.agent_request("ExecProcess", agent.exec_process(cid, exec_id, proc.spec))
        else:
            result = await self.sandbox.agent_request("StartContainer", agent.start_container(cid))
        proc.guest_pid = result if isinstance(result, int) else 0
        proc.status = t.TaskStatus.RUNNING
        if proc.io is not None:
            proc.io.start(self.nursery)
        pid = self.task_pid
        # published before Start returns, so it precedes TaskExit (docs/protocols.md §2)
        self.publish(ev.ExecStarted(cid, exec_id, pid) if exec_id else ev.TaskStarted(cid, pid))
        self.nursery.start_soon(self._wait_exit, c, proc)
        self._log.info("process started", container_id=cid, exec_id=exec_id, start_s=round(time.monotonic() - t0, 3))
        return pid

    async def _wait_exit(self, c: Container, proc: Process) -> None:
        try:
            status = await self.sandbox.agent.wait_process(c.id, proc.agent_exec_id)
        except Exception as exc:
            if proc.exited.is_set():
                return
            self._log.warning("wait_process failed", container_id=c.id, exec_id=proc.exec_id, error=str(exc))
            status = 255
        if proc.io is not None:
            await proc.io.wait_drained()
            proc.io.close()
        self._mark_exited(c, proc, int(status))

    def _mark_exited(self, c: Container, proc: Process, status: int) -> None:
        if proc.exited.is_set():
            return
        proc.exit_status = status & 0xFFFFFFFF
        proc.exited_at = time.time()
        proc.status = t.TaskStatus.STOPPED
        proc.exited.set()
        self.publish(ev.TaskExited(c.id, proc.exec_id or c.id, self.task_pid, proc.exit_status, proc.exited_at))
        self._log.info("process exited", container_id=c.id, exec_id=proc.exec_id, exit_status=proc.exit_status)

    def vm_lost(self, reason: str) -> None:
        """The VM died: every live process is gone (exit 255, Kata's choice too)."""
        for c in self.containers.values():
            for proc in [c.init, *c.execs.values()]:
                if proc.io is not None:
                    proc.io.close()
                self._mark_exited(c, proc, 255)
        self._log.error("sandbox VM lost; all processes marked exited", reason=reason)

    # -- exec -------------------------------------------------------------------

    async def exec(self, req: t.ExecTask) -> None:
        c = self.get(req.id)
        if not req.exec_id:
            raise InvalidArgument("exec id is empty")
        if req.exec_id in c.execs:
            raise AlreadyExists(f"exec {req.exec_id!r} already exists in container {req.id}")
        if c.init.status == t.TaskStatus.STOPPED:
            raise FailedPrecondition(f"container {req.id} is stopped")
        bundle_mod.check_process(req.process, f"exec {req.exec_id}")
        if bool(req.process.get("terminal", False)) != req.stdio.terminal:
            raise InvalidArgument(f"exec {req.exec_id}: process.terminal does not match the request's terminal")
        proc = Process(req.id, req.exec_id, req.stdio, req.process)
        proc.io = ProcessIO(self.sandbox.agent, req.id, req.exec_id, req.stdio)
        proc.io.open()
        c.execs[req.exec_id] = proc
        self.publish(ev.ExecAdded(req.id, req.exec_id))

    # -- signals, state ---------------------------------------------------------

    async def kill(self, req: t.KillProcess) -> None:
        c = self.get(req.id)
        proc = c.process(req.exec_id)
        if req.signal <= 0 or req.signal >= 65:
            raise InvalidArgument(f"signal {req.signal} is out of range")
        if proc.status == t.TaskStatus.STOPPED and not req.all:
            raise NotFound(f"process {req.id}/{req.exec_id or 'init'} already finished")
        if proc.status == t.TaskStatus.CREATED and not req.exec_id:
            # never started: nothing runs in the guest yet (runc kills its waiting init)
            if proc.io is not None:
                proc.io.close()
            self._mark_exited(c, proc, 128 + req.signal)
            return
        if proc.status == t.TaskStatus.CREATED:
            raise FailedPrecondition(f"exec {req.exec_id} was not started")
        await self.sandbox.agent.signal_process(req.id, "" if req.all else proc.agent_exec_id, req.signal)

    def state(self, cid: str, exec_id: str) -> t.ProcessState:
        c = self.get(cid)
        proc = c.process(exec_id)
        return t.ProcessState(id=cid, exec_id=exec_id, bundle=str(c.bundle), pid=self.task_pid,
                              status=proc.status, stdio=proc.stdio, exit_status=proc.exit_status,
                              exited_at=proc.exited_at)

    async def pids(self, cid: str) -> t.ProcessList:
        """Every process of the container in the guest, by guest pid (the agent's ListProcesses reads the
        container's cgroup), as ``ctr task ps`` and CRI expect; an exec's row carries its exec id."""
        c = self.get(cid)
        if c.init.status not in (t.TaskStatus.RUNNING, t.TaskStatus.PAUSED):
            return t.ProcessList(())
        try:
            found = await self.sandbox.agent_request("ListProcesses", self.sandbox.agent.list_processes(cid))
        except ValueError as exc:  # the guest's answer failed the client's checks
            raise Unavailable(f"container {cid}: the guest's process list is unusable: {exc}") from None
        return t.ProcessList(tuple(t.ProcessEntry(p.pid, p.exec_id or "") for p in found))

    async def wait(self, cid: str, exec_id: str) -> t.ExitInfo:
        proc = self.get(cid).process(exec_id)
        await proc.exited.wait()
        return proc.exit_info(self.task_pid)

    # -- pause, update, stats, tty ----------------------------------------------

    async def pause(self, cid: str) -> None:
        c = self.get(cid)
        if c.init.status != t.TaskStatus.RUNNING:
            raise FailedPrecondition(f"container {cid} is {c.init.status.name.lower()}, not running")
        await self.sandbox.agent.pause_container(cid)
        for p in [c.init, *c.execs.values()]:
            if p.status == t.TaskStatus.RUNNING:
                p.status = t.TaskStatus.PAUSED
        self.publish(ev.TaskPaused(cid))

    async def resume(self, cid: str) -> None:
        c = self.get(cid)
        if c.init.status != t.TaskStatus.PAUSED:
            raise FailedPrecondition(f"container {cid} is {c.init.status.name.lower()}, not paused")
        await self.sandbox.agent.resume_container(cid)
        for p in [c.init, *c.execs.values()]:
            if p.status == t.TaskStatus.PAUSED:
                p.status = t.TaskStatus.RUNNING
        self.publish(ev.TaskResumed(cid))

    async def update(self, req: t.UpdateTask) -> None:
        c = self.get(req.id)
        if c.init.status == t.TaskStatus.STOPPED:
            raise FailedPrecondition(f"container {req.id} is stopped")
        # as Kata: the VM is resized first (growing), then the container's cgroup; a section left out
        # ("cpu", "memory") leaves that limit as it was
        if ("cpu" in req.resources or "memory" in req.resources) and _sized_resources(c.spec) is not None:
            await self.sandbox.resize_for(req.id, req.resources, update=True)
        await self.sandbox.agent.update_container(req.id, req.resources)

    async def stats(self, cid: str) -> t.Stats:
        c = self.get(cid)
        if c.init.status not in (t.TaskStatus.RUNNING, t.TaskStatus.PAUSED):
            raise FailedPrecondition(f"container {cid} is {c.init.status.name.lower()}; no stats")
        raw = await self.sandbox.agent.stats_container(cid)
        return t.Stats(
            cpu_usage_usec=raw.cpu.total_usage_ns // 1000, cpu_user_usec=raw.cpu.user_ns // 1000,
            cpu_system_usec=raw.cpu.kernel_ns // 1000, memory_usage=raw.memory.usage,
            memory_limit=raw.memory.limit, memory_max_usage=raw.memory.max_usage,
            memory_stat=dict(raw.memory.stats), pids_current=raw.pids_current, pids_limit=raw.pids_limit,
        )

    async def resize_pty(self, req: t.ResizePty) -> None:
        proc = self.get(req.id).process(req.exec_id)
        if not proc.stdio.terminal:
            raise FailedPrecondition(f"process {req.id}/{req.exec_id or 'init'} has no tty")
        if proc.status != t.TaskStatus.RUNNING:
            return
        await self.sandbox.agent.tty_win_resize(req.id, proc.agent_exec_id, req.height, req.width)

    def close_io(self, req: t.CloseIO) -> None:
        proc = self.get(req.id).process(req.exec_id)
        if req.stdin and proc.io is not None:
            proc.io.close_stdin()

    # -- delete -----------------------------------------------------------------

    async def delete(self, cid: str, exec_id: str) -> t.ExitInfo:
        c = self.get(cid)
        if exec_id:
            proc = c.process(exec_id)
            if proc.status in (t.TaskStatus.RUNNING, t.TaskStatus.PAUSED):
                raise FailedPrecondition(f"exec {exec_id} is still running; kill it first")
            if proc.io is not None:
                proc.io.close()
            del c.execs[exec_id]
            info = proc.exit_info(self.task_pid)
            self.publish(ev.TaskDeleted(cid, exec_id, info.pid, info.exit_status, info.exited_at))
            return info
        if c.init.status in (t.TaskStatus.RUNNING, t.TaskStatus.PAUSED):
            raise FailedPrecondition(f"container {cid} is still running; kill it first")
        if c.init.status == t.TaskStatus.CREATED:  # created, never started
            self._mark_exited(c, c.init, 128 + int(signals.SIGKILL))
        if self.sandbox.agent is not None and self.sandbox.vm_exit is None:
            try:
                with trio.move_on_after(REMOVE_TIMEOUT_S + 2):
                    await self.sandbox.agent.remove_container(cid, REMOVE_TIMEOUT_S)
            except Exception as exc:
                self._log.warning("remove_container failed", container_id=cid, error=str(exc))
        self._release(c)
        del self.containers[cid]
        await self.sandbox.detach_devices(cid)
        await self._give_back_vcpus(cid)
        if cid in self.sandbox.record.containers:
            self.sandbox.record.containers.remove(cid)
        self.sandbox.record.save()
        info = c.init.exit_info(self.task_pid)
        self.publish(ev.TaskDeleted(cid, cid, info.pid, info.exit_status, info.exited_at))
        self._log.info("container deleted", container_id=cid)
        return info

    async def _give_back_vcpus(self, cid: str) -> None:
        """Shrink the VM for a container that is gone; a failure is logged (the container is gone anyway)."""
        if self.sandbox.vm_exit is not None:
            return
        try:
            await self.sandbox.resize_for(cid, None)
        except FailedPrecondition as exc:
            self._log.warning("vCPUs not given back", container_id=cid, error=str(exc))

    def _release(self, c: Container) -> None:
        for proc in [c.init, *c.execs.values()]:
            if proc.io is not None:
                proc.io.close()
        if c.volumes is not None:
            volumes.unshare(c.volumes)
        rootfs.release(self.sandbox.shared_dir, c.id)


def _sized_resources(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The OCI resources that size the VM for this container: None for a CRI sandbox (pause) container,
    whose limits are the pod's and already sized the VM at boot (katapy.shim.annotations)."""
    if (spec.get("annotations") or {}).get(bundle_mod.CONTAINER_TYPE) == "sandbox":
        return None
    return (spec.get("linux") or {}).get("resources") or {}
