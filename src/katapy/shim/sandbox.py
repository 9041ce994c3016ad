"""SandboxManager: one pod's VM, its agent connection and its host resources
(Kata runtime-rs ``virt_container::sandbox::VirtSandbox``).

Start order: sandbox directory and record -> host cgroup (the shim joins it,
so VMM threads and an external VMM inherit it) -> ``Hypervisor.start_vm`` with
the virtio-fs share -> ``AgentClient.connect`` over hybrid vsock ->
``CreateSandbox`` with the virtio-fs storage (docs/protocols.md §4: tag ``katapy-shared``
mounted at /run/katapy/shared).  Once the VM runs, the agent's log port is
forwarded into the shim's log (``agent_log``).  Any failure undoes everything done so far.
Stop order is the reverse; ``stop`` is idempotent.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from katapy import log
from katapy.linux.fds import exhaustion_note
from katapy.resource import mounts
from katapy.resource.cgroups import CgroupError, SandboxCgroup
from katapy.resource.cpu import CpuResource, ResizeError, VcpuPolicy
from katapy.resource.memory import MemoryPolicy, MemoryResource
from katapy.resource.rootfs import GUEST_SHARED_DIR
from katapy.shim.agent_log import AgentLogForwarder
from katapy.shim.errors import FailedPrecondition, InvalidArgument, Unavailable
from katapy.shim.persist import SandboxRecord

if TYPE_CHECKING:
    from katapy.config import KatapyConfig
    from katapy.hypervisor.base import Hypervisor, VmExit

SHARED_FS_TAG = "katapy-shared"
AGENT_SHUTDOWN_TIMEOUT_S = 5.0
CONSOLE_LOG_BYTES = 3000  # of the VM console's end, logged when the agent does not answer
T = TypeVar("T")


@dataclass
class BootTimes:
    """Seconds spent in each start step (the benchmark's breakdown)."""

    vm_start_s: float = 0.0
    agent_connect_s: float = 0.0
    create_sandbox_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def sandbox_dir(config: KatapyConfig, sandbox_id: str) -> Path:
    return Path(config.runtime.state_dir) / sandbox_id


class SandboxManager:
    """Owns one sandbox VM.  ``agent`` is the connected AgentClient once started."""

    def __init__(self, sandbox_id: str, config: KatapyConfig, nursery: trio.Nursery) -> None:
        """``nursery``: the shim's long-lived nursery; the agent connection's task lives there, since a
        trio nursery (the ttrpc client's reader) must be entered and left by the same task."""
        self.sandbox_id = sandbox_id
        self.config = config
        self.nursery = nursery
        self.dir = sandbox_dir(config, sandbox_id)
        self.shared_dir = self.dir / "shared"
        self.hypervisor: Hypervisor | None = None
        self.agent: Any = None
        self.cgroup: SandboxCgroup | None = None
        self.record = SandboxRecord(sandbox_id, str(self.dir), str(self.shared_dir), shim_pid=os.getpid())
        self.times = BootTimes()
        self.vm_exit: VmExit | None = None
        self._agent_release = trio.Event()
        self._agent_closed = trio.Event()
        self._stopping = False
        self._stopped = False
        self._log = log.get("shim.sandbox", sandbox_id=sandbox_id)
        self.network: Any = None  # katapy.resource.network.sandbox.SandboxNetwork for a CNI-made netns
        self.cpu: CpuResource | None = None  # the VM's vCPUs, sized from the containers' limits
        self.memory: MemoryResource | None = None  # the VM's RAM, sized from the containers' limits
        self.devices: Any = None  # katapy.resource.devices.SandboxDevices: containers' hot-plugged block devices
        self.agent_log: AgentLogForwarder | None = None  # the agent's log lines into this shim's log
        self._console: Path | None = None  # the VM's console log

    @property
    def vmm_pid(self) -> int:
        """The host process running the VMM: the shim for builtin, QEMU for qemu (Kata reports it as task pid)."""
        if self.hypervisor is not None:
            pid = self.hypervisor.metrics().get("pid")
            if isinstance(pid, int) and pid > 0:
                return pid
        return os.getpid()

    async def start(self, hostname: str, dns: list[str], netns_path: str | None = None,
                    sizing: Any = None) -> None:
        """``netns_path``: the pod netns CNI populated (carried into the VM); ``sizing``: a
        ``katapy.shim.annotations.SandboxSizing`` from the pod annotations (None: configured defaults)."""
        from katapy import hypervisor as hv_mod

        if self.dir.exists() and SandboxRecord.load(self.dir) is not None:
            raise Unavailable(f"sandbox {self.sandbox_id}: state {self.dir} exists (a previous shim was not cleaned up)")
        try:
            self.shared_dir.mkdir(parents=True, exist_ok=True)
            self.record.save()
            self.cgroup = SandboxCgroup.create(self.sandbox_id)
            self.cgroup.add_process(os.getpid())
            self.record.cgroup_dirs = [str(d) for d in self.cgroup.dirs]
            self.record.save()

            self.hypervisor = hv_mod.select(self.config)
            vmcfg = hv_mod.vm_config(self.config, self.sandbox_id, shared_dir=self.shared_dir,
                                     state_dir=self.dir / "vm",
                                     kernel_params=sizing.kernel_params if sizing is not None else "")
            if sizing is not None:
                import dataclasses

                vmcfg = dataclasses.replace(vmcfg, vcpus=sizing.vcpus, memory_mib=sizing.memory_mib)
            self._console = vmcfg.console_path
            if netns_path:
                await self._attach_network(netns_path)
            t0 = time.monotonic()
            await self.hypervisor.start_vm(vmcfg)
            self.times.vm_start_s = time.monotonic() - t0
            self.record.vmm_pid = self.vmm_pid
            self.record.agent_socket = str(self.hypervisor.agent_socket())
            self.record.debug_console = vmcfg.debug_console
            self.record.save()
            log_path = Path(f"{self.hypervisor.agent_socket()}_{self.config.agent.log_port}")
            self.agent_log = await self.nursery.start(AgentLogForwarder(log_path, self._log).run)

            t0 = time.monotonic()
            await self._connect_agent()
            self.times.agent_connect_s = time.monotonic() - t0

            from katapy.agent_client.types import Storage

            t0 = time.monotonic()
            share = Storage(driver="virtio-fs", source=SHARED_FS_TAG, fstype="virtiofs",
                            mount_point=GUEST_SHARED_DIR)
            await self.agent_request("CreateSandbox", self.agent.create_sandbox(
                hostname=hostname, dns=dns, sandbox_id=self.sandbox_id, storages=[share]))
            self.times.create_sandbox_s = time.monotonic() - t0
            self.cpu = CpuResource(self._vcpu_policy(vmcfg, sizing), self.hypervisor, self.agent, self.sandbox_id)
            self.memory = MemoryResource(self._memory_policy(vmcfg, sizing), self.hypervisor, self.sandbox_id)
            from katapy.resource.devices import SandboxDevices

            self.devices = SandboxDevices(self.hypervisor, self.sandbox_id)
            if self.network is not None:
                await self.network.configure_guest(self.agent)
                await self.network.forward_ports(self.nursery, self.hypervisor.agent_socket())
        except BaseException as exc:
            self._log.error("sandbox start failed", error=str(exc))
            with trio.CancelScope(shield=True):
                await self.stop()
            if isinstance(exc, OSError):  # the host ran out of something (disk, fds): say where, in which step
                raise Unavailable(f"sandbox {self.sandbox_id}: cannot create it under {self.dir}: {exc}"
                                  f"{exhaustion_note(error=exc)}") from exc
            raise
        self._log.info("sandbox started", backend=self.hypervisor.name, vmm_pid=self.record.vmm_pid,
                       vm_start_s=round(self.times.vm_start_s, 3),
                       agent_connect_s=round(self.times.agent_connect_s, 3),
                       create_sandbox_s=round(self.times.create_sandbox_s, 3))

    def _memory_policy(self, vmcfg: Any, sizing: Any) -> MemoryPolicy:
        base = self.config.hypervisor.default_memory
        return MemoryPolicy(base=min(base, vmcfg.memory_mib), floor=vmcfg.memory_mib, max_mib=vmcfg.max_memory_mib)

    def _vcpu_policy(self, vmcfg: Any, sizing: Any) -> VcpuPolicy:
        """Boot size and base from the annotations' sizing (or the configuration), maximum from the VM."""
        base = sizing.base_vcpus if sizing is not None else self.config.hypervisor.default_vcpus
        return VcpuPolicy(base=min(base, vmcfg.vcpus), floor=vmcfg.vcpus, max_vcpus=vmcfg.max_vcpus)

    async def resize_for(self, cid: str, resources: dict[str, Any] | None, update: bool = False) -> None:
        """Size the VM for ``cid``'s OCI resources (None: the container is gone); FailedPrecondition if not.

        On an ``update`` (UpdateTask) only the sections present change the VM, and a memory size the
        backend cannot reach is an error; on create a backend without memory hotplug keeps its boot size."""
        if self.cpu is None:
            return
        try:
            if resources is None:
                await self.cpu.remove_container(cid)
                if self.memory is not None:
                    await self.memory.remove_container(cid)
                return
            if not update or "cpu" in resources:
                await self.cpu.set_container(cid, resources)
            if self.memory is not None and (not update or "memory" in resources):
                await self.memory.set_container(cid, resources, strict=update)
        except ResizeError as exc:
            raise FailedPrecondition(f"container {cid}: {exc}") from None

    async def attach_devices(self, cid: str, spec: dict[str, Any]) -> list[Any]:
        """Hot-attach ``cid``'s block devices (``linux.devices`` type b); the agent Devices for CreateContainer.

        InvalidArgument for a bad device entry or numbers no host device has; FailedPrecondition when the
        backend cannot attach it.  Nothing stays attached for ``cid`` after an error."""
        from katapy.resource.devices import DeviceError, DeviceSpecError, HostDeviceError

        if self.devices is None:
            return []
        try:
            return await self.devices.attach(cid, spec)
        except (DeviceSpecError, HostDeviceError) as exc:
            raise InvalidArgument(f"container {cid}: {exc}") from None
        except DeviceError as exc:
            raise FailedPrecondition(str(exc)) from None

    async def detach_devices(self, cid: str) -> None:
        """``cid`` is gone: detach the block devices only it used (failures are logged)."""
        if self.devices is not None:
            await self.devices.detach(cid)

    async def _attach_network(self, netns_path: str) -> None:
        from katapy.resource.network import NetworkError
        from katapy.resource.network.sandbox import SandboxNetwork

        self.network = SandboxNetwork(netns_path, self.sandbox_id)
        try:
            await self.network.attach(self.hypervisor)
        except NetworkError as exc:
            raise FailedPrecondition(f"sandbox {self.sandbox_id}: pod network: {exc}") from None

    async def _connect_agent(self) -> None:
        """Dial the agent; a failure says how far the guest got (its console's end goes to the shim log)."""
        from katapy.shim.agent_dial import VmEndedBeforeAgent, console_notes, last_lines
        from katapy.ttrpc.errors import TtrpcError

        try:
            self.agent = await self.nursery.start(self._hold_agent)
        except VmEndedBeforeAgent as exc:
            ended = exc.vm_exit
            self._log.error("VM ended before the agent answered", reason=ended.reason, detail=ended.detail,
                            console_tail=ended.console_tail[-CONSOLE_LOG_BYTES:])
            raise Unavailable(f"sandbox {self.sandbox_id}: the VM ended before its agent answered: {ended.reason}"
                              f" ({ended.detail}); its console ends: {last_lines(ended.console_tail)}") from None
        except TtrpcError as exc:
            tail = console_notes(exc)
            self._log.error("agent did not answer while the VM runs", error=exc.message,
                            console_tail=tail[-CONSOLE_LOG_BYTES:])
            raise Unavailable(f"sandbox {self.sandbox_id}: {exc.message}; the VM still runs, its console ends: "
                              f"{last_lines(tail)} (more in the shim log)") from None

    async def agent_request(self, method: str, call: Awaitable[T]) -> T:
        """Await an agent request that sets something up, bounded by ``[agent] request_timeout``: a guest
        that stopped answering (stuck, its VMM stopped) fails the containerd request instead of hanging it."""
        timeout = self.config.agent.request_timeout
        with trio.move_on_after(timeout):
            return await call
        tail = self._console_tail()
        self._log.error("agent did not answer a request", method=method, timeout_s=timeout,
                        console_tail=tail[-CONSOLE_LOG_BYTES:])
        raise Unavailable(f"sandbox {self.sandbox_id}: the agent did not answer {method} within {timeout:g}s "
                          f"([agent] request_timeout); the guest is stuck or its VMM is stopped")

    def _console_tail(self) -> str:
        from katapy.shim.agent_dial import console_tail

        return console_tail(self._console)

    async def _hold_agent(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, hand the client to ``start``, and keep it open until ``stop`` releases it."""
        from katapy.shim.agent_dial import dial_agent

        assert self.hypervisor is not None
        started = False
        try:
            client = await dial_agent(self.hypervisor, self.config.agent.port, self.config.agent.dial_timeout,
                                      self._console)
            async with client as agent:
                task_status.started(agent)
                started = True
                await self._agent_release.wait()
        except Exception as exc:
            if not started:
                raise  # nursery.start hands it to _connect_agent
            self._log.error("agent connection task failed", error=str(exc))  # must not end the shim
        finally:
            self._agent_closed.set()

    async def watch_vm(self, on_exit: Callable[[VmExit], Awaitable[None]]) -> None:
        """Wait for the VM to end; an unexpected end calls ``on_exit`` (processes are then lost)."""
        assert self.hypervisor is not None
        exit_ = await self.hypervisor.wait_exit()
        self.vm_exit = exit_
        if not self._stopping:
            self._log.error("sandbox VM ended unexpectedly", reason=exit_.reason, detail=exit_.detail,
                            console_tail=exit_.console_tail[-400:])
            await on_exit(exit_)

    async def watch_oom(self, on_oom: Callable[[str], None]) -> None:
        """Long-poll the agent's OOM events (GetOOMEvent) until the sandbox stops."""
        while not self._stopping and self.agent is not None:
            try:
                cid = await self.agent.get_oom_event()
            except Exception as exc:
                if not self._stopping:
                    self._log.info("oom watch ended", reason=str(exc))
                return
            if cid:
                on_oom(cid)

    async def stop(self) -> None:
        """Tear the sandbox down: agent, VM, cgroup, share, state.  Idempotent; never raises for a dead VM."""
        if self._stopped:
            return
        self._stopping = True
        with trio.CancelScope(shield=True):
            if self.agent is not None:
                with trio.move_on_after(AGENT_SHUTDOWN_TIMEOUT_S):
                    try:
                        await self.agent.destroy_sandbox()
                    except Exception as exc:
                        self._log.info("destroy_sandbox failed", reason=str(exc))
                self._agent_release.set()
                await self._agent_closed.wait()
                self.agent = None
            if self.devices is not None and self.vm_exit is None:
                await self.devices.detach_all()  # the guest still runs: it unbinds each before the VMM lets go
            if self.agent_log is not None:
                self.agent_log.stop()
                self.agent_log = None
            if self.hypervisor is not None:
                try:
                    await self.hypervisor.stop_vm()
                except Exception as exc:
                    self._log.info("stop_vm failed", reason=str(exc))
                await self.hypervisor.cleanup()
            if self.network is not None:
                await self.network.release()
            self._release_host()
        self._stopped = True
        self._log.info("sandbox stopped")

    def _release_host(self) -> None:
        mounts.unmount_all_under(self.shared_dir)
        if self.cgroup is not None:
            try:
                self.cgroup.leave(os.getpid())
                self.cgroup.kill_all(exclude={os.getpid()})
                self.cgroup.destroy()
            except CgroupError as exc:
                self._log.error("sandbox cgroup cleanup failed", error=str(exc))
        if not mounts.mount_points_under(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            self._log.error("sandbox directory still has mounts; left in place", dir=str(self.dir))
