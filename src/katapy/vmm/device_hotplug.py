"""Device hotplug on the built-in VMM: virtio-blk and virtio-net devices added to and removed from a running VM.

The VMM reserves empty virtio-mmio windows at build time
(``VmResources.hotplug_slots``; katapy.vmm.device_manager.HotplugSlot), each
on the kernel command line with its own IOAPIC pin and, while empty, a
placeholder answering DeviceID 0 (katapy.vmm.virtio.placeholder), which the
guest's ``virtio_mmio_probe`` declines.  The guest is told through the upcall
channel (``katapy.vmm.upcall``, ADD_MMIO / DEL_MMIO, dbs-upcall's device
manager service); katapy's guest agent binds or unbinds the slot's platform
device ``virtio-mmio.<N>`` to the virtio-mmio driver through sysfs
(katapy.agent.upcall.mmio), so a stock kernel with
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is all the guest needs.

Ordering keeps host and guest consistent (as katapy.vmm.memory_hotplug):

* plug: the slot is populated first (irqfd, ioeventfds, transport on the bus:
  the guest's probe must find the device), then ADD_MMIO.  A refusal (the
  guest answered an errno, or the request never left) empties the slot again
  and closes the device.  A timeout or a lost channel leaves it plugged: the
  guest may have bound a driver, and pulling the registers from under it
  would break the driver; :class:`DeviceInDoubt` says where it stays.
* unplug: DEL_MMIO first (the guest unbinds the driver, which resets the
  device: virtio 1.2, 3.3.1), then the slot is emptied: placeholder back,
  transport and device closed (the disk image or tap fd with it), eventfds
  unregistered from KVM and closed.  A refusal or a lost answer keeps it.
"""
from __future__ import annotations

import threading
from typing import Protocol

from katapy import log
from katapy.vmm.boot import layout
from katapy.vmm.device_manager import MmioDeviceManager
from katapy.vmm.virtio.device import VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VirtioDevice

_log = log.get("vmm.device_hotplug")

#: the device types a hotplug slot takes (virtio 1.2, section 5 device IDs)
HOTPLUG_TYPES = {VIRTIO_ID_BLOCK: "virtio-blk", VIRTIO_ID_NET: "virtio-net"}


class DeviceHotplugError(RuntimeError):
    """A plug or unplug that cannot be done; the message says why and what state the VM is in."""


class DeviceInDoubt(DeviceHotplugError):
    """ADD_MMIO got no answer: the device stays plugged at ``base`` (an unplug removes it)."""

    def __init__(self, message: str, base: int, irq: int) -> None:
        super().__init__(message)
        self.base = base
        self.irq = irq


class MmioUpcall(Protocol):
    """The two device-manager requests device hotplug needs (``katapy.vmm.upcall.DeviceManagerClient``)."""

    def add_mmio(self, base: int, size: int, irq: int) -> None: ...

    def remove_mmio(self, base: int, size: int, irq: int) -> None: ...


def refused(exc: BaseException) -> bool:
    """True when the guest did not change anything: it answered with an errno, or the request never left
    (a connect failure, a bad greeting, a busy channel: ``UpcallError.sent`` is False)."""
    from katapy.vmm.upcall import UpcallError, UpcallRefused

    return isinstance(exc, UpcallRefused) or (isinstance(exc, UpcallError) and not exc.sent)


def close_device(device: VirtioDevice) -> None:
    """Close a device the VMM was handed but did not plug (errors logged, never raised)."""
    try:
        device.close()
    except Exception as exc:
        _log.error("closing a device that was not plugged failed", error=repr(exc))


class DeviceHotplug:
    """The hotplug slots of one VM: :meth:`plug` a device into a free one, :meth:`unplug` it by base."""

    def __init__(self, devices: MmioDeviceManager, upcall: MmioUpcall) -> None:
        self.devices = devices
        self.upcall = upcall
        self._lock = threading.Lock()

    def plugged(self) -> dict[int, VirtioDevice]:
        """base -> device of every populated hotplug slot."""
        return {h.base: h.plugged.transport.device for h in self.devices.hotplug if h.plugged is not None}

    def plug(self, device: VirtioDevice) -> tuple[int, int]:
        """Populate a free slot with ``device`` and have the guest bind it; returns (base, irq).

        The device is the VMM's from this call on: on every error except :class:`DeviceInDoubt` it has
        been closed (its image or tap fd released) and the VM is as before.
        """
        with self._lock:
            kind = HOTPLUG_TYPES.get(getattr(device, "device_type", -1))
            if kind is None:
                close_device(device)
                raise DeviceHotplugError(
                    f"device type {getattr(device, 'device_type', None)!r} ({type(device).__name__}) cannot be "
                    f"hot-plugged: only {' and '.join(HOTPLUG_TYPES.values())}")
            try:
                slot = self.devices.populate(device)
            except Exception as exc:  # no free slot (DeviceManagerError), KVM refused an eventfd (OSError)
                close_device(device)
                raise DeviceHotplugError(f"hot-plugging a {kind} device: {exc}") from exc
            base, irq = slot.base, slot.irq
            try:
                self.upcall.add_mmio(base, layout.MMIO_DEVICE_LEN, irq)
            except Exception as exc:
                if refused(exc):
                    self.devices.depopulate(base)
                    raise DeviceHotplugError(f"the guest refused or never got ADD_MMIO of the {kind} device at "
                                             f"{base:#x} (irq {irq}): {exc}; the slot was emptied") from exc
                raise DeviceInDoubt(f"hot-plugging the {kind} device at {base:#x} (irq {irq}): no answer from the "
                                    f"guest ({exc}); the device stays plugged", base, irq) from exc
            _log.info("device hot-plugged", kind=kind, base=hex(base), irq=irq)
            return base, irq

    def unplug(self, base: int) -> None:
        """Have the guest unbind the device at ``base``, then empty its slot (device and fds closed)."""
        with self._lock:
            h = next((h for h in self.devices.hotplug if h.base == base and h.plugged is not None), None)
            if h is None:
                have = ", ".join(f"{b:#x}" for b in self.plugged()) or "none"
                raise DeviceHotplugError(f"no hot-plugged device at {base:#x} (hot-plugged: {have})")
            assert h.plugged is not None
            kind = HOTPLUG_TYPES.get(h.plugged.transport.device.device_type, "virtio")
            try:
                self.upcall.remove_mmio(base, layout.MMIO_DEVICE_LEN, h.irq)
            except Exception as exc:
                raise DeviceHotplugError(f"unplugging the {kind} device at {base:#x}: {exc}; "
                                         f"the device stays plugged") from exc
            self.devices.depopulate(base)
            _log.info("device unplugged", kind=kind, base=hex(base), irq=h.irq)
