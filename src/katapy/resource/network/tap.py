"""Tap devices in the pod netns (Linux ``Documentation/networking/tuntap.rst``).

The tap is created persistent (owned by the netns, not by an fd) with
rtnetlink, so it exists before any VMM runs and teardown can delete it by
name.  ``open_queue`` attaches a file descriptor to it (TUNSETIFF on
/dev/net/tun): it must run inside the pod netns, because /dev/net/tun looks
the name up in the namespace of the opener.  That fd is what the VMM uses:
QEMU gets it as ``-netdev tap,fd=N``, the builtin VMM reads and writes it.
"""
from __future__ import annotations

import fcntl
import os
import struct
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from katapy.resource.network.types import NetworkError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
_GONE = (2, 19)  # ENOENT, ENODEV


def tap_name(n: int) -> str:
    """Name of the n-th tap in a pod netns (at most 15 bytes, IFNAMSIZ - 1)."""
    return f"tap{n}_katapy"


def create(ipr: Any, name: str, mtu: int) -> int:
    """Create the persistent tap ``name`` with ``mtu``, bring it up; return its ifindex."""
    if ipr.link_lookup(ifname=name):
        raise NetworkError(f"tap {name} already exists in the pod netns (another sandbox uses this netns?)")
    try:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        index = int(ipr.link_lookup(ifname=name)[0])
        ipr.link("set", index=index, mtu=mtu, state="up")
    except (NetlinkError, OSError, IndexError) as exc:
        delete(ipr, name)
        raise NetworkError(f"creating tap {name}: {exc}") from None
    return index


def delete(ipr: Any, name: str) -> bool:
    """Delete the tap if it exists; True when one was deleted."""
    found = ipr.link_lookup(ifname=name)
    if not found:
        return False
    try:
        ipr.link("del", index=found[0])
    except NetlinkError as exc:
        if exc.code in _GONE:
            return False
        raise NetworkError(f"deleting tap {name}: {exc}") from None
    return True


def open_queue(name: str, vnet_hdr: bool = True) -> int:
    """An fd attached to the existing tap ``name`` in the *current* netns (close-on-exec)."""
    if len(name.encode()) >= IFNAMSIZ:
        raise NetworkError(f"tap name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise NetworkError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"attaching to tap {name}: {exc.strerror}") from None
    return fd
