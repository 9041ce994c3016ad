"""ADD_MMIO / DEL_MMIO: bind and unbind the placeholder virtio-mmio platform devices the VMM declared at boot.

The VMM puts ``virtio_mmio.device=<size>@<base>:<irq>`` on the kernel command
line for every slot it may populate later (Documentation/admin-guide/
kernel-parameters.txt, ``virtio_mmio.device=``; drivers/virtio/virtio_mmio.c,
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).  The kernel registers one platform device
per slot, named ``virtio-mmio.<id>`` (ids from 0 in command-line order); an
empty slot answers DeviceID 0, so ``virtio_mmio_probe`` declines it and it
stays unbound.  When the VMM has populated the slot it sends ADD_MMIO and the
guest probes it again by binding it (driver-model "bind"/"unbind" attributes,
Documentation/ABI/testing/sysfs-bus-platform and drivers/base/bus.c).

Finding the device whose window starts at ``base``:

* ``/sys/module/virtio_mmio/parameters/device`` (root-readable) lists the
  command-line devices, one ``0x<size>@0x<base>:<irq>:<id>`` line each
  (``vm_cmdline_get_device``), so the irq can be checked too;
* else ``/proc/iomem``, where each device's MEM resource is a line
  ``<start>-<end> : virtio-mmio.<id>`` (hex, nested resources indented).

Binding: write the name to ``/sys/bus/platform/drivers/virtio-mmio/bind``.
``bind_store`` may report the probe's failure as an errno or not at all, so
success is judged by the driver's link ``.../virtio-mmio/<name>`` existing
afterwards.  Unbinding writes the name to ``.../unbind``; the kernel answers
ENODEV for a device that is not bound to the driver, so an unbound device is
done without a write.  A ``base`` no device starts at is ENODEV.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from katapy.agent import log
from katapy.agent.upcall.sysfs import Sysfs, errno_of

if TYPE_CHECKING:
    from collections.abc import Callable

DEVICE_PARAM = "sys/module/virtio_mmio/parameters/device"
IOMEM = "proc/iomem"
DRIVER = "sys/bus/platform/drivers/virtio-mmio"

_PARAM_LINE = re.compile(r"0x([0-9a-fA-F]+)@0x([0-9a-fA-F]+):(\d+):(-?\d+)")
_NAME = re.compile(r"virtio-mmio\.\d+")


@dataclass(frozen=True)
class MmioSlot:
    """A virtio-mmio platform device: its name, window and (when known) interrupt line."""

    name: str
    base: int
    size: int
    irq: int | None = None


def parse_device_param(text: str) -> list[MmioSlot]:
    """The devices in ``/sys/module/virtio_mmio/parameters/device`` (lines that do not parse are skipped)."""
    slots = []
    for line in text.splitlines():
        m = _PARAM_LINE.fullmatch(line.strip())
        if m:
            size, base, irq, dev_id = m.groups()
            slots.append(MmioSlot(f"virtio-mmio.{dev_id}", int(base, 16), int(size, 16), int(irq)))
    return slots


def parse_iomem(text: str) -> list[MmioSlot]:
    """The ``virtio-mmio.<id>`` resources in ``/proc/iomem``, at any nesting depth."""
    slots = []
    for line in text.splitlines():
        span, sep, name = line.strip().partition(" : ")
        start, dash, end = span.partition("-")
        if not (sep and dash and _NAME.fullmatch(name.strip())):
            continue
        try:
            low, high = int(start, 16), int(end, 16)
        except ValueError:
            continue
        slots.append(MmioSlot(name.strip(), low, high - low + 1))
    return slots


class MmioHotplug:
    """Virtio-mmio slots and the platform driver's bind files under ``sysfs`` (``/`` in the guest)."""

    def __init__(self, sysfs: Sysfs | None = None) -> None:
        self.sysfs = sysfs or Sysfs()
        self.driver = self.sysfs.path(DRIVER)

    def _slots_from(self, rel: str, parse: Callable[[str], list[MmioSlot]]) -> list[MmioSlot]:
        try:
            return parse(self.sysfs.read(self.sysfs.path(rel)))
        except OSError:
            return []

    def find(self, base: int) -> MmioSlot | None:
        """The device whose MEM window starts at ``base``: the module parameter first, then /proc/iomem."""
        for rel, parse in ((DEVICE_PARAM, parse_device_param), (IOMEM, parse_iomem)):
            for slot in self._slots_from(rel, parse):
                if slot.base == base:
                    return slot
        return None

    def bound(self, name: str) -> bool:
        """Whether the virtio-mmio driver has ``name`` (its link ``drivers/virtio-mmio/<name>``)."""
        return self.sysfs.exists(self.driver / name)

    def _slot(self, base: int, size: int, irq: int) -> MmioSlot:
        slot = self.find(base)
        if slot is None:
            raise OSError(errno.ENODEV, f"no virtio-mmio device at {base:#x}")
        if slot.irq is not None and slot.irq != irq:
            raise OSError(errno.EINVAL, f"{slot.name} at {base:#x} has irq {slot.irq}, not {irq}")
        if slot.size != size:
            log.warning("upcall: virtio-mmio window size differs", device=slot.name, base=f"{base:#x}",
                        size=f"{slot.size:#x}", requested=f"{size:#x}")
        return slot

    def add(self, base: int, size: int, irq: int) -> int:
        """ADD_MMIO: bind the device at ``base`` to virtio-mmio; 0 or ``-errno``."""
        try:
            slot = self._slot(base, size, irq)
            if self.bound(slot.name):
                return 0
            try:
                self.sysfs.write(self.driver / "bind", slot.name)
            except OSError as exc:
                if not self.bound(slot.name):
                    raise OSError(errno_of(exc), f"bind {slot.name}: {exc.strerror or exc}") from None
            if not self.bound(slot.name):  # the probe declined it: still DeviceID 0, or an unsupported version
                raise OSError(errno.ENODEV, f"{slot.name} did not bind (see the guest kernel log)")
        except OSError as exc:
            log.warning("upcall: adding virtio-mmio device failed", base=f"{base:#x}", irq=irq, error=str(exc))
            return -errno_of(exc)
        log.info("upcall: virtio-mmio device bound", device=slot.name, base=f"{base:#x}", irq=irq)
        return 0

    def remove(self, base: int, size: int, irq: int) -> int:
        """DEL_MMIO: unbind the device at ``base`` (not bound: nothing to do); 0 or ``-errno``."""
        try:
            slot = self._slot(base, size, irq)
            if not self.bound(slot.name):
                return 0
            try:
                self.sysfs.write(self.driver / "unbind", slot.name)
            except OSError as exc:
                if self.bound(slot.name):
                    raise OSError(errno_of(exc), f"unbind {slot.name}: {exc.strerror or exc}") from None
            if self.bound(slot.name):
                raise OSError(errno.EBUSY, f"{slot.name} is still bound after unbind")
        except OSError as exc:
            log.warning("upcall: removing virtio-mmio device failed", base=f"{base:#x}", irq=irq, error=str(exc))
            return -errno_of(exc)
        log.info("upcall: virtio-mmio device unbound", device=slot.name, base=f"{base:#x}")
        return 0
