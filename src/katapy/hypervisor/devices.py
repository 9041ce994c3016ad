"""The virtio devices every sandbox VM gets, whichever backend runs it.

* vsock (virtio 1.2, 5.10) with the hybrid-vsock host side at
  ``<state_dir>/vsock.sock``: the agent's channel;
* virtio-fs (virtio 1.2, 5.11) with tag ``katapy-shared`` exporting the
  sandbox's ``shared_dir`` (container rootfs and volumes), when there is one.

Block and net devices the shim adds (``cold_device``) get in-process back
ends with the builtin backend; QEMU uses its own for those.

The device back ends are ``katapy.vmm.virtio``'s.  The builtin backend plugs
them into its virtio-mmio transport; the qemu backend serves them to QEMU over
vhost-user.  A missing back end is reported with the module that lacks it.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from katapy.hypervisor.base import BlockDevice, Device, HypervisorError, VmConfig

SHARED_FS_TAG = "katapy-shared"


@dataclass
class SandboxDevice:
    dev_id: str  # "vsock" | "shared-fs"
    device: Any  # a katapy.vmm.virtio.device.VirtioDevice
    qemu_model: str  # the vhost-user device QEMU fronts it with
    qemu_props: dict[str, str]


def _load(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise HypervisorError(f"the {module}.{name} device back end is not available: {exc}") from None


def require_backends(shared_fs: bool) -> None:
    """Raise HypervisorError naming the first missing back end (vsock, fs, vhost-user)."""
    _load("katapy.vmm.virtio.vsock", "VsockDevice")
    if shared_fs:
        _load("katapy.vmm.virtio.fs", "FsDevice")


def sandbox_devices(cfg: VmConfig) -> list[SandboxDevice]:
    """Construct the sandbox's devices (not yet activated; the caller closes them)."""
    vsock_cls = _load("katapy.vmm.virtio.vsock", "VsockDevice")
    fs_cls = _load("katapy.vmm.virtio.fs", "FsDevice") if cfg.shared_dir is not None else None
    out = [SandboxDevice("vsock", vsock_cls(cfg.guest_cid, str(cfg.vsock_path)), "vhost-user-vsock-device", {})]
    if fs_cls is not None:
        try:
            fs = fs_cls(SHARED_FS_TAG, str(cfg.shared_dir))
        except BaseException:
            out[0].device.close()
            raise
        out.append(SandboxDevice("shared-fs", fs, "vhost-user-fs-device", {"tag": SHARED_FS_TAG}))
    return out


def cold_device(dev: Device) -> SandboxDevice:
    """The in-process back end for a block or net device (the builtin backend's cold-plug)."""
    if isinstance(dev, BlockDevice):
        blk_cls = _load("katapy.vmm.virtio.blk", "BlockDevice")
        return SandboxDevice(dev.dev_id, blk_cls(dev.path, read_only=dev.read_only), "virtio-blk-device", {})
    net_cls = _load("katapy.vmm.virtio.net", "NetDevice")
    # the back end owns (and closes) the fd it gets: hand it a duplicate, the caller keeps its own
    tap_fd = os.dup(dev.tap_fd) if dev.tap_fd is not None else None
    return SandboxDevice(dev.dev_id, net_cls(dev.tap_name, dev.mac, tap_fd=tap_fd), "virtio-net-device", {})
