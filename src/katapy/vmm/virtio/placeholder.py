"""An empty virtio-mmio slot: a window the guest knows about from boot but no device behind it yet.

The VMM lists every hotplug slot on the kernel command line
(``virtio_mmio.device=4K@0x<base>:<irq>``, drivers/virtio/virtio_mmio.c with
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), so the guest kernel registers one
platform device ``virtio-mmio.<N>`` per slot at boot.  While the slot is
empty its registers read as virtio 1.2, 4.2.2 prescribes for "no device":
MagicValue "virt", Version 2, DeviceID 0; ``virtio_mmio_probe`` then returns
-ENODEV ("a (dummy) placeholder with no function") and the platform device
stays unbound until the VMM populates the slot and the guest binds it again
(ADD_MMIO, katapy.agent.upcall.mmio).  Every other register reads 0 and every
write is dropped: the placeholder has no state a guest could change.
"""
from __future__ import annotations

import struct

from katapy.vmm.virtio.mmio import DEVICE_ID, MAGIC_VALUE, MMIO_MAGIC_VALUE, MMIO_VERSION, VERSION


class PlaceholderSlot:
    """Bus device of an empty virtio-mmio window (DeviceID 0)."""

    def read(self, offset: int, length: int) -> bytes:
        if length != 4 or offset % 4:
            return bytes(length)
        value = {MAGIC_VALUE: MMIO_MAGIC_VALUE, VERSION: MMIO_VERSION, DEVICE_ID: 0}.get(offset, 0)
        return struct.pack("<I", value)

    def write(self, offset: int, data: bytes) -> None:
        """Ignored: an empty slot has nothing to configure."""
