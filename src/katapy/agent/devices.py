"""Devices the host hot-plugged for a container, mapped into its OCI spec before crun runs
(Kata agent ``src/agent/src/device.rs``: the ``mmioblk`` handler and ``update_spec_devices``).

The host (``katapy.resource.devices``) attaches a container's block device as
virtio-blk on a virtio-mmio slot and sends, in CreateContainer, an agent.proto
``Device``: ``type`` "mmioblk", ``vm_path`` the slot's guest-physical base
("0x..."), ``container_path`` the ``linux.devices`` entry it stands for.  Here:

1. the slot's platform device is the one whose MEM window starts at ``vm_path``
   (:meth:`katapy.agent.upcall.mmio.MmioHotplug.find`);
2. the virtio-blk driver gives it a disk, ``/sys/bus/platform/devices/<slot>/virtio<N>/block/<disk>``,
   whose ``dev`` attribute is ``major:minor`` (Documentation/ABI/testing/sysfs-block);
   it is waited for (bounded: the VMM returned once the driver was bound, but the disk is added by
   the probe asynchronously);
3. ``/dev/<disk>`` is made if devtmpfs has not (mknod);
4. the spec is rewritten (runtime-spec config-linux.md "Devices", "Device allowlist"): the
   ``linux.devices`` entry whose ``path`` is ``container_path`` gets the guest's numbers, and each
   ``linux.resources.devices`` rule naming the host's numbers (type ``b``) names the guest's.  All
   rewrites are decided from the spec as the host sent it, then applied, so one device's new
   numbers are never mistaken for another's old ones.

Standard library only; imported only when a CreateContainer carries devices.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from katapy.agent import log
from katapy.ttrpc.errors import DeadlineExceeded, InvalidArgument, NotFound

#: Kata's device type for virtio-blk on virtio-mmio (kata-types ``DRIVER_MMIO_BLK_TYPE``)
MMIOBLK = "mmioblk"
HANDLERS = (MMIOBLK,)
DEVICE_WAIT_S = 10.0
_POLL_S = 0.05


@dataclass(frozen=True)
class DeviceRequest:
    """agent.proto Device, as plain values."""

    id: str
    type: str
    vm_path: str
    container_path: str
    options: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GuestDisk:
    """The guest's block device for a hot-plugged slot."""

    name: str  # e.g. "vdb"
    major: int
    minor: int
    node: str  # /dev/<name>


def _base(dev: DeviceRequest) -> int:
    text = dev.vm_path.strip()
    if not text.lower().startswith("0x"):
        raise InvalidArgument(f"device {dev.id}: vm_path {dev.vm_path!r} is not a virtio-mmio base address (0x...)")
    try:
        return int(text, 16)
    except ValueError:
        raise InvalidArgument(f"device {dev.id}: vm_path {dev.vm_path!r} is not a hex address") from None


def _parse_dev(text: str, where: Path) -> tuple[int, int]:
    major, sep, minor = text.strip().partition(":")
    if not (sep and major.isdigit() and minor.isdigit()):
        raise InvalidArgument(f"{where}: {text.strip()!r} is not major:minor")
    return int(major), int(minor)


def _disk_of(slot_dir: Path) -> Path | None:
    """``<slot>/virtio<N>/block/<disk>`` once the disk has its ``dev`` attribute."""
    try:
        virtios = [p for p in slot_dir.iterdir() if p.name.startswith("virtio")]
    except OSError:
        return None
    for v in sorted(virtios):
        block = v / "block"
        try:
            disks = sorted(block.iterdir())
        except OSError:
            continue
        for disk in disks:
            if (disk / "dev").exists():
                return disk
    return None


def find_disk(dev: DeviceRequest, root: str | Path = "/", timeout: float = DEVICE_WAIT_S) -> GuestDisk:
    """The guest disk of the mmioblk device ``dev``; it is waited for up to ``timeout`` seconds."""
    from katapy.agent.upcall.mmio import MmioHotplug
    from katapy.agent.upcall.sysfs import Sysfs

    base = _base(dev)
    sysfs = Sysfs(root)
    slot = MmioHotplug(sysfs).find(base)
    if slot is None:
        raise NotFound(f"device {dev.id}: no virtio-mmio device at {base:#x} in the guest "
                       f"(virtio_mmio.device= on the kernel command line names the slots)")
    slot_dir = sysfs.path("sys/bus/platform/devices") / slot.name
    deadline = time.monotonic() + timeout
    while (disk := _disk_of(slot_dir)) is None:
        if time.monotonic() >= deadline:
            bound = "bound to virtio-mmio" if (slot_dir / "driver").exists() else "not bound to any driver"
            raise DeadlineExceeded(f"device {dev.id}: {slot.name} at {base:#x} ({bound}) has no virtio-blk disk "
                                   f"after {timeout:.1f} s ({slot_dir}/virtio*/block/)")
        time.sleep(_POLL_S)
    major, minor = _parse_dev((disk / "dev").read_text(), disk / "dev")
    node = sysfs.path("dev") / disk.name
    _ensure_node(node, major, minor)
    log.info("device found", id=dev.id, slot=slot.name, base=f"{base:#x}", disk=disk.name, dev=f"{major}:{minor}")
    return GuestDisk(disk.name, major, minor, f"/dev/{disk.name}")


def _ensure_node(node: Path, major: int, minor: int) -> None:
    """``/dev/<disk>``: devtmpfs makes it; made here with the right numbers if it has not."""
    try:
        st = os.stat(node)
    except FileNotFoundError:
        try:
            os.mknod(node, stat.S_IFBLK | 0o660, os.makedev(major, minor))
            return
        except FileExistsError:  # devtmpfs made it meanwhile
            st = os.stat(node)
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(major, minor):
        raise InvalidArgument(f"{node} exists but is not block device {major}:{minor}")


def update_spec(config: dict[str, Any], found: list[tuple[DeviceRequest, GuestDisk]]) -> None:
    """Give each device's ``linux.devices`` entry, and the allowlist rules for it, the guest's numbers."""
    linux = config.setdefault("linux", {})
    entries = linux.get("devices") or []
    rules = (linux.get("resources") or {}).get("devices") or []
    entry_updates: dict[int, GuestDisk] = {}
    rule_updates: dict[int, GuestDisk] = {}
    for dev, disk in found:
        matches = [i for i, e in enumerate(entries) if e.get("path") == dev.container_path]
        if not matches:
            raise InvalidArgument(f"device {dev.id}: the spec has no linux.devices entry with path "
                                  f"{dev.container_path!r}")
        for i in matches:
            entry = entries[i]
            if entry.get("type") != "b":
                raise InvalidArgument(f"device {dev.id}: linux.devices entry {dev.container_path} is type "
                                      f"{entry.get('type')!r}, not a block device")
            host = (entry.get("major"), entry.get("minor"))
            entry_updates[i] = disk
            for j, rule in enumerate(rules):
                if rule.get("type") == "b" and (rule.get("major"), rule.get("minor")) == host:
                    rule_updates[j] = disk
    for i, disk in entry_updates.items():
        entries[i]["major"], entries[i]["minor"] = disk.major, disk.minor
    for j, disk in rule_updates.items():
        rules[j]["major"], rules[j]["minor"] = disk.major, disk.minor


def apply(config: dict[str, Any], devices: list[DeviceRequest], root: str | Path = "/",
          timeout: float = DEVICE_WAIT_S) -> list[GuestDisk]:
    """Find every device's guest disk and rewrite ``config`` for them; ttrpc errors name the device."""
    for dev in devices:
        if dev.type not in HANDLERS:
            raise InvalidArgument(f"device {dev.id}: unknown device type {dev.type!r} (this agent handles "
                                  f"{', '.join(HANDLERS)})")
        if not dev.container_path.startswith("/"):
            raise InvalidArgument(f"device {dev.id}: container_path {dev.container_path!r} is not absolute")
    deadline = time.monotonic() + timeout
    found = [(dev, find_disk(dev, root, max(0.0, deadline - time.monotonic()))) for dev in devices]
    update_spec(config, found)
    return [disk for _, disk in found]
