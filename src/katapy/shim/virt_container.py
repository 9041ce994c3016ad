"""VirtContainer: the runtime handler that runs containers inside a VM
(Kata runtime-rs ``runtimes/virt_container``; linux/wasm containers would be siblings).

The first Create of a shim builds the instance: it loads katapy's
configuration (the runtime options' ``config_path``, else the default), checks
the bundle before anything is started, starts the sandbox VM, then creates
the container.  Later Creates (CRI pod members) join that VM.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from katapy import log
from katapy.shim import bundle as bundle_mod
from katapy.shim import events as ev
from katapy.shim import types as t
from katapy.shim.container import ContainerManager
from katapy.shim.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from katapy.shim.sandbox import SandboxManager
from katapy.shim.stdio import validate as validate_stdio

if TYPE_CHECKING:
    from katapy.config import KatapyConfig
    from katapy.hypervisor.base import VmExit


def load_config(options: t.RuntimeOptions | None) -> KatapyConfig:
    """katapy.config with the runtime options' config path, errors as InvalidArgument."""
    from katapy import config as config_mod

    path = options.config_path if options is not None and options.config_path else None
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        raise InvalidArgument(f"katapy configuration: {exc}") from None


class VirtContainer:
    """One shim's VM-backed runtime: a sandbox and its containers."""

    def __init__(self, publish: Callable[[ev.TaskEvent], None], nursery: trio.Nursery) -> None:
        self.publish = publish
        self.nursery = nursery
        self.sandbox: SandboxManager | None = None
        self.containers: ContainerManager | None = None
        self.sandbox_container_id = ""
        self.sandbox_started = trio.Event()  # set once the sandbox VM runs with its first container
        self._creating = trio.Lock()
        self._log = log.get("shim.virt_container")

    def manager(self) -> ContainerManager:
        if self.containers is None:
            raise NotFound("no container was created in this shim")
        return self.containers

    async def create(self, req: t.CreateTask) -> int:
        if req.checkpoint:
            raise InvalidArgument("restoring from a checkpoint is not supported by katapy")
        spec = bundle_mod.load_spec(req.bundle)
        validate_stdio(req.stdio)
        async with self._creating:
            if self.sandbox is None:
                return await self._create_sandbox(req, spec)
            if self.sandbox.vm_exit is not None:
                raise Unavailable(f"sandbox {self.sandbox.sandbox_id} VM is gone ({self.sandbox.vm_exit.reason})")
            assert self.containers is not None
            return await self.containers.create(req, spec)

    async def _create_sandbox(self, req: t.CreateTask, spec: dict[str, Any]) -> int:
        if bundle_mod.is_pod_member(spec):
            raise FailedPrecondition(f"container {req.id} belongs to sandbox "
                                     f"{bundle_mod.sandbox_id(spec, req.id)}, which this shim does not run")
        # check what can be checked before paying for a VM
        from katapy.resource import namespaces, rootfs, volumes

        root = spec.get("root") or {}
        try:
            rootfs.check(req.bundle, root.get("path", ""),
                         [rootfs.RootfsMount(m.type, m.source, m.options) for m in req.rootfs])
            volumes.validate(spec.get("mounts"))
            if bundle_mod.annotations(spec).get(bundle_mod.CONTAINER_TYPE) == "sandbox":
                namespaces.check_pod_sandbox(spec)
        except (rootfs.RootfsError, volumes.VolumeError, namespaces.NamespaceError) as exc:
            raise InvalidArgument(f"container {req.id}: {exc}") from None
        if bool(spec["process"].get("terminal", False)) != req.stdio.terminal:
            raise InvalidArgument(f"config.json process.terminal={spec['process'].get('terminal', False)} but the "
                                  f"task asks terminal={req.stdio.terminal}")

        config = load_config(req.options)
        # pod annotations and the CRI netns (katapy.shim.annotations, katapy.resource.network)
        from katapy.resource.network import netns_path_from_spec
        from katapy.shim.annotations import sandbox_sizing

        sizing = sandbox_sizing(spec.get("annotations") or {}, config.hypervisor)
        sandbox = SandboxManager(bundle_mod.sandbox_id(spec, req.id), config, self.nursery)
        ann = bundle_mod.annotations(spec)  # a CRI pod names itself (katapy monitor labels its metrics with it)
        sandbox.record.pod_name = ann.get(bundle_mod.SANDBOX_NAME, "")
        sandbox.record.pod_namespace = ann.get(bundle_mod.SANDBOX_NAMESPACE, "")
        from katapy.resource.etc_files import dns_from_spec, hostname_for

        await sandbox.start(hostname=hostname_for(spec, req.id), dns=dns_from_spec(spec),
                            netns_path=netns_path_from_spec(spec),
                            sizing=sizing)
        containers = ContainerManager(sandbox, self.publish, self.nursery)
        try:
            pid = await containers.create(req, spec)
        except BaseException:
            with trio.CancelScope(shield=True):
                await sandbox.stop()
            raise
        self.sandbox, self.containers, self.sandbox_container_id = sandbox, containers, req.id
        self.sandbox_started.set()
        self.nursery.start_soon(sandbox.watch_vm, self._vm_lost)
        self.nursery.start_soon(sandbox.watch_oom, self._oom)
        return pid

    async def _vm_lost(self, exit_: VmExit) -> None:
        if self.containers is not None:
            self.containers.vm_lost(f"{exit_.reason}: {exit_.detail}")

    def _oom(self, container_id: str) -> None:
        self.publish(ev.TaskOOM(container_id))

    async def delete(self, cid: str, exec_id: str) -> t.ExitInfo:
        info = await self.manager().delete(cid, exec_id)
        if not exec_id and cid == self.sandbox_container_id and not self.manager().containers:
            await self.stop_sandbox()
        return info

    async def stop_sandbox(self) -> None:
        if self.sandbox is not None:
            await self.sandbox.stop()

    @property
    def has_containers(self) -> bool:
        return bool(self.containers and self.containers.containers)
