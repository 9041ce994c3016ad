"""virtio-fs served in-process (inline FUSE passthrough of a host directory)."""
from katapy.vmm.virtio.fs.device import FsDevice

__all__ = ["FsDevice"]
