"""Host devices a container asks for, hot-plugged into the sandbox VM (Kata runtime-rs
``resource/src/manager_inner.rs`` ``handle_linux_devices`` and its device manager).

* :mod:`.spec` - the block devices of an OCI spec's ``linux.devices`` (runtime-spec
  config-linux.md "Devices") and whether the cgroup allowlist lets the container write them;
* :mod:`.host` - the host node behind a ``major:minor`` (``/sys/dev/block/<major>:<minor>/uevent``);
* :mod:`.manager` - :class:`~.manager.SandboxDevices`: hot-attach as virtio-blk, the agent's
  ``mmioblk`` Device for each, and detaching when the container (or the sandbox) ends.

Character devices (type ``c``) and ``u``/``p`` entries are not touched: crun in the guest creates
them from the spec as before.
"""
from katapy.resource.devices.host import HostDeviceError, resolve_block
from katapy.resource.devices.manager import (
    MMIOBLK,
    DeviceAttachError,
    DeviceError,
    DeviceUnsupported,
    SandboxDevices,
)
from katapy.resource.devices.spec import BlockRequest, DeviceSpecError, block_requests

__all__ = [
    "MMIOBLK", "BlockRequest", "DeviceAttachError", "DeviceError", "DeviceSpecError", "DeviceUnsupported",
    "HostDeviceError", "SandboxDevices", "block_requests", "resolve_block",
]
