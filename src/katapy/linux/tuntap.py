"""Attaching to a tap device (Linux ``Documentation/networking/tuntap.rst``, include/uapi/linux/if_tun.h).

A queue is a file descriptor on ``/dev/net/tun`` bound to a tap by name with
TUNSETIFF.  /dev/net/tun looks the name up in the network namespace of the
process that opens it, so :func:`open_queue` must run in the tap's netns.
The pod network (``katapy.resource.network.tap``) opens the fds it hands to
a VMM; the built-in VMM's virtio-net back end (``katapy.vmm.virtio.net.tap``)
opens its own when given only a name.  Both speak through this module.
"""
from __future__ import annotations

import fcntl
import os
import struct

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name[IFNAMSIZ], ifr_flags, padding to 40 bytes


class TunError(OSError):
    """A tap queue could not be opened; ``strerror`` says which step and why."""


def open_queue(name: str, vnet_hdr: bool = True) -> int:
    """An fd attached to the existing tap ``name`` in the *current* netns (close-on-exec, non-blocking)."""
    if len(name.encode()) >= IFNAMSIZ:
        raise TunError(0, f"tap name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        raise TunError(exc.errno, f"attaching to tap {name}: {exc.strerror}") from None
    return fd
