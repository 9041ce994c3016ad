"""virtio-vsock with a hybrid (unix socket) host side."""
from katapy.vmm.virtio.vsock.device import VsockDevice

__all__ = ["VsockDevice"]
