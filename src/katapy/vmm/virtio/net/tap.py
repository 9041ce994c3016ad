"""The host end of a virtio-net device: a tap file descriptor (Documentation/networking/tuntap.rst).

The device reads and writes whole Ethernet frames, each preceded by the
virtio-net header: the fd must be attached with IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR (katapy.linux.tuntap.open_queue does that; the pod network
calls it inside the pod netns), and here its header size is set to 12
(TUNSETVNETHDRSZ; 10 for a legacy driver, at activation) and every
offload is turned off (TUNSETOFFLOAD 0), so the kernel hands over complete,
checksummed frames, which is all the driver is told to expect.
"""
from __future__ import annotations

import fcntl
import os
import struct

from katapy.linux.tuntap import (
    IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, IFREQ, TUNGETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ, TunError, open_queue,
)
from katapy.vmm.virtio.net.header import HEADER_SIZE


class TapError(OSError):
    """The tap cannot serve as a virtio-net back end."""


class Tap:
    """A non-blocking tap fd prepared for virtio-net frames; owns the fd."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    @classmethod
    def open(cls, name: str) -> Tap:
        """Attach to the existing tap ``name`` in the current network namespace (never creates one:
        TUNSETIFF on an unknown name would make a fresh tap nobody configured)."""
        import socket

        try:
            socket.if_nametoindex(name)
        except OSError:
            raise TapError(19, f"no network interface {name!r} in this network namespace") from None
        try:
            fd = open_queue(name, vnet_hdr=True)
        except TunError as exc:
            raise TapError(0, exc.strerror) from None
        return cls.adopt(fd)

    @classmethod
    def adopt(cls, fd: int) -> Tap:
        """Take an fd already attached to a tap (e.g. opened in the pod netns); closed on failure."""
        try:
            raw = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ.size))
            name_raw, flags = IFREQ.unpack(raw)
            name = name_raw.rstrip(b"\0").decode(errors="replace")
            want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            if flags & want != want:
                raise TapError(0, f"tap {name} fd has flags {flags:#x}; virtio-net needs IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HEADER_SIZE))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            os.set_blocking(fd, False)
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, TapError):
                raise
            raise TapError(exc.errno, f"preparing tap fd {fd}: {exc.strerror}") from None
        return cls(fd, name)

    def set_header_size(self, size: int) -> None:
        """The virtio-net header length the driver negotiated (12, or 10 for a legacy driver)."""
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", size))
        except OSError as exc:
            raise TapError(exc.errno, f"tap {self.name}: TUNSETVNETHDRSZ {size}: {exc.strerror}") from None

    def read_frame(self, size: int) -> bytes | None:
        """One header+frame (truncated to ``size``), or None when nothing is queued."""
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None

    def write_frame(self, data: bytes) -> None:
        """Queue one header+frame for the host; raises OSError (EAGAIN when the tap queue is full)."""
        os.write(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
