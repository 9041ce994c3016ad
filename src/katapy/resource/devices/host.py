"""The host block device behind a ``major:minor`` (Documentation/ABI/testing/sysfs-dev).

``/sys/dev/block/<major>:<minor>`` links to the device's sysfs directory; its
``uevent`` file carries ``DEVNAME=<name>``, the node's path below ``/dev``
(what udev and devtmpfs create; drivers/base/core.c ``dev_uevent``).  The node
found there must be a block device with those very numbers: containerd put
them in the spec from the host path the container asked for, so anything else
is an error, not a guess.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


class HostDeviceError(Exception):
    """No host block device has the numbers, or its node is missing or is not that device."""


def devname(major: int, minor: int, root: Path | str = "/") -> str:
    """``DEVNAME`` from ``<root>/sys/dev/block/<major>:<minor>/uevent``."""
    uevent = Path(root) / "sys/dev/block" / f"{major}:{minor}" / "uevent"
    try:
        text = uevent.read_text()
    except FileNotFoundError:
        raise HostDeviceError(f"no host block device {major}:{minor} ({uevent} does not exist)") from None
    except OSError as exc:
        raise HostDeviceError(f"block device {major}:{minor}: cannot read {uevent}: {exc.strerror or exc}") from None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME":
            name = value.strip()
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise HostDeviceError(f"block device {major}:{minor}: {uevent} has a bad DEVNAME {name!r}")
            return name
    raise HostDeviceError(f"block device {major}:{minor}: {uevent} has no DEVNAME")


def resolve_block(major: int, minor: int, root: Path | str = "/") -> Path:
    """The host node (``<root>/dev/<DEVNAME>``) of block device ``major:minor``; HostDeviceError if none."""
    node = Path(root) / "dev" / devname(major, minor, root)
    try:
        st = os.stat(node)
    except OSError as exc:
        raise HostDeviceError(f"block device {major}:{minor}: its node {node} cannot be found: "
                              f"{exc.strerror or exc}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise HostDeviceError(f"block device {major}:{minor}: {node} is not a block device")
    found = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if found != (major, minor):
        raise HostDeviceError(f"block device {major}:{minor}: {node} is {found[0]}:{found[1]}")
    return node
