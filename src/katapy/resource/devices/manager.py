"""SandboxDevices: containers' block devices hot-plugged into one sandbox VM as virtio-blk
(Kata runtime-rs ``resource/src/manager_inner.rs`` ``handle_linux_devices`` and
``device/device_manager.rs``; the agent side is ``katapy.agent.devices``).

For each type-``b`` entry of a container's ``linux.devices`` (:mod:`.spec`) the
host node is found from its numbers (:mod:`.host`) and hot-attached with
``Hypervisor.add_device(BlockDevice)`` (read-only when the container's device
cgroup denies it ``w``); the agent is then given, in CreateContainer, a Kata
agent.proto ``Device``::

    {id: <dev_id>, type: "mmioblk", vm_path: "0x<virtio-mmio base>", container_path: <entry's path>}

from which it finds the disk the guest made of it and rewrites the spec's
numbers to the guest's.  As Kata's device manager does, one host device is
attached once per sandbox and shared by the containers that ask for it
(a reference per container); it is detached when the last of them is removed,
and :meth:`SandboxDevices.detach_all` detaches what is left when the sandbox ends.

A container's attach is all or nothing: a failure (a backend without hotplug,
``UnsupportedError``) detaches what that create attached before it raises.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from katapy import log
from katapy.agent_client.types import Device
from katapy.resource.devices.host import resolve_block
from katapy.resource.devices.spec import BlockRequest, block_requests

#: Kata's driver type for a virtio-blk device on virtio-mmio (kata-types ``DRIVER_MMIO_BLK_TYPE``)
MMIOBLK = "mmioblk"
#: bound on one hot-attach (the guest binds the driver) and one detach
ATTACH_TIMEOUT_S = 60.0
DETACH_TIMEOUT_S = 15.0


class DeviceError(Exception):
    """A container's device cannot be given to it; the message names the device."""


class DeviceUnsupported(DeviceError):
    """The hypervisor backend cannot hot-plug block devices."""


class DeviceAttachError(DeviceError):
    """The backend tried and failed to attach the device."""


def device_id(container_id: str, container_path: str) -> str:
    """A VMM device id for ``container_path`` of ``container_id``: stable, short, and safe in any backend."""
    digest = hashlib.sha256(f"{container_id}\0{container_path}".encode()).hexdigest()[:16]
    return f"blk-{digest}"


@dataclass
class Attached:
    """A host block device attached to the VM, and the containers using it."""

    dev_id: str
    host_path: Path
    read_only: bool
    address: int  # guest-physical base of its virtio-mmio window
    users: set[str] = field(default_factory=set)


class SandboxDevices:
    """The block devices attached to one sandbox's VM (one attach or detach at a time)."""

    def __init__(self, hypervisor: Any, sandbox_id: str = "", sys_root: Path | str = "/") -> None:
        self.hypervisor = hypervisor
        self.sys_root = Path(sys_root)
        self.attached: dict[Path, Attached] = {}  # by host node
        self._lock = trio.Lock()
        self._log = log.get("resource.devices", sandbox_id=sandbox_id)

    @property
    def _backend(self) -> str:
        name = getattr(self.hypervisor, "name", "") or type(self.hypervisor).__name__
        label = getattr(self.hypervisor, "vmm_label", "")
        return f"{name} ({label})" if label and label != name else name

    def in_use_by(self, cid: str) -> list[Attached]:
        return [a for a in self.attached.values() if cid in a.users]

    async def attach(self, cid: str, spec: dict[str, Any]) -> list[Device]:
        """Attach ``cid``'s block devices; the agent's Devices for them ([] when it asks for none).

        DeviceSpecError for a malformed spec, HostDeviceError for numbers no host device has,
        DeviceUnsupported / DeviceAttachError when the backend cannot; nothing stays attached for
        ``cid`` after an error."""
        requests = block_requests(spec)
        if not requests:
            return []
        resolved = [(r, resolve_block(r.major, r.minor, self.sys_root)) for r in requests]
        out: list[Device] = []
        async with self._lock:
            taken: list[Attached] = []
            try:
                for req, host in resolved:
                    entry = await self._take(cid, req, host)
                    taken.append(entry)
                    out.append(Device(id=entry.dev_id, type=MMIOBLK, vm_path=f"{entry.address:#x}",
                                      container_path=req.container_path))
            except BaseException:
                with trio.CancelScope(shield=True):
                    for entry in reversed(taken):
                        await self._release(cid, entry)
                raise
        return out

    async def _take(self, cid: str, req: BlockRequest, host: Path) -> Attached:
        what = f"container {cid}: block device {req.container_path} (host {host}, {req.major}:{req.minor})"
        entry = self.attached.get(host)
        if entry is not None:
            if entry.read_only and not req.read_only:
                raise DeviceAttachError(f"{what}: already attached read-only to the sandbox for "
                                        f"{', '.join(sorted(entry.users))}; it cannot also be writable")
            entry.users.add(cid)
            self._log.info("block device shared", container_id=cid, container_path=req.container_path,
                           host=str(host), dev_id=entry.dev_id, users=len(entry.users))
            return entry
        from katapy.hypervisor.base import BlockDevice, HypervisorError, UnsupportedError

        dev_id = device_id(cid, req.container_path)
        added = False
        try:
            with trio.fail_after(ATTACH_TIMEOUT_S):
                await self.hypervisor.add_device(BlockDevice(dev_id, host, read_only=req.read_only))
            added = True
            address = int(self.hypervisor.guest_device_address(dev_id))
        except UnsupportedError as exc:
            if added:
                with trio.CancelScope(shield=True):
                    await self._remove(dev_id, host)
            raise DeviceUnsupported(f"{what} cannot be hot-plugged: the {self._backend} backend does not support "
                                    f"block device hotplug: {exc}") from None
        except (HypervisorError, OSError, trio.TooSlowError) as exc:
            with trio.CancelScope(shield=True):
                await self._remove(dev_id, host)  # it may be half-way in; a no-op error if it never was
            reason = f"no answer in {ATTACH_TIMEOUT_S:.0f} s" if isinstance(exc, trio.TooSlowError) else str(exc)
            raise DeviceAttachError(f"{what}: hot-attaching it to the {self._backend} VM failed: {reason}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._remove(dev_id, host)
            raise
        entry = Attached(dev_id, host, req.read_only, address, {cid})
        self.attached[host] = entry
        self._log.info("block device attached", container_id=cid, container_path=req.container_path,
                       host=str(host), dev_id=dev_id, read_only=req.read_only, mmio_base=f"{address:#x}")
        return entry

    async def _release(self, cid: str, entry: Attached) -> None:
        entry.users.discard(cid)
        if entry.users:
            return
        self.attached.pop(entry.host_path, None)
        await self._remove(entry.dev_id, entry.host_path)

    async def _remove(self, dev_id: str, host: Path) -> bool:
        """Hot-unplug ``dev_id``; a failure is logged (the VM's end releases it anyway)."""
        from katapy.hypervisor.base import HypervisorError

        try:
            with trio.fail_after(DETACH_TIMEOUT_S):
                await self.hypervisor.remove_device(dev_id)
        except (HypervisorError, OSError, trio.TooSlowError) as exc:
            self._log.warning("block device not detached", dev_id=dev_id, host=str(host),
                              error=str(exc) or type(exc).__name__)
            return False
        self._log.info("block device detached", dev_id=dev_id, host=str(host))
        return True

    async def detach(self, cid: str) -> None:
        """``cid`` is gone: detach the devices no other container uses."""
        async with self._lock:
            with trio.CancelScope(shield=True):
                for entry in self.in_use_by(cid):
                    await self._release(cid, entry)

    async def detach_all(self) -> None:
        """The sandbox ends: detach every device still attached."""
        async with self._lock:
            with trio.CancelScope(shield=True):
                for host, entry in list(self.attached.items()):
                    self.attached.pop(host, None)
                    entry.users.clear()
                    await self._remove(entry.dev_id, host)
