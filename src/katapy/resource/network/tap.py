"""Tap devices in the pod netns (Linux ``Documentation/networking/tuntap.rst``).

The tap is created persistent (owned by the netns, not by an fd) with
rtnetlink, so it exists before any VMM runs and teardown can delete it by
name.  ``open_queue`` attaches a file descriptor to it (TUNSETIFF on
/dev/net/tun): it must run inside the pod netns, because /dev/net/tun looks
the name up in the namespace of the opener (the ioctl itself is
``katapy.linux.tuntap``).  That fd is what the VMM uses: QEMU gets it as
``-netdev tap,fd=N``, the builtin VMM reads and writes it.
"""
from __future__ import annotations

from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from katapy.linux import tuntap
from katapy.resource.network.types import NetworkError

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
    try:
        return tuntap.open_queue(name, vnet_hdr)
    except tuntap.TunError as exc:
        raise NetworkError(exc.strerror) from None
