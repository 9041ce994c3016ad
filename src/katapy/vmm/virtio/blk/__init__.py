"""virtio-blk over a raw disk image (virtio 1.2, section 5.2)."""
from katapy.vmm.virtio.blk.device import BlockDevice
from katapy.vmm.virtio.blk.image import DiskImage, DiskImageError

__all__ = ["BlockDevice", "DiskImage", "DiskImageError"]
