"""Guest mounts for the Kata ``Storage`` message (agent.proto Storage).

Drivers katapy handles (names from Kata's kata-types storage handlers):
``virtio-fs`` (source is the virtio-fs tag; fstype virtiofs), ``ephemeral`` /
``tmpfs`` (a tmpfs), ``local`` / ``bind`` (a bind mount of a guest path), and
``blk`` / ``mmioblk`` (source is a guest block device path, e.g. /dev/vda,
mounted with its fstype such as ext4; the agent waits for it to appear).
Mounts use mount(2) through libc, loaded only when a storage arrives.
"""
from __future__ import annotations

import os
import time

from katapy.protocol.types import Storage
from katapy.ttrpc.errors import FailedPrecondition, Internal, InvalidArgument

# mount(2) flags (include/uapi/linux/mount.h)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MNT_DETACH = 2
_FLAG_OPTIONS = {
    "ro": MS_RDONLY, "rw": 0, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "bind": MS_BIND, "rbind": MS_BIND | MS_REC, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
    "suid": 0, "dev": 0, "exec": 0, "defaults": 0,
}
DEVICE_WAIT_S = 10.0
DRIVERS = ("virtio-fs", "ephemeral", "tmpfs", "local", "bind", "blk", "mmioblk")


def _libc():  # type: ignore[no-untyped-def]
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def mount(source: str, target: str, fstype: str | None, flags: int, data: str) -> None:
    import ctypes

    libc = _libc()
    rc = libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                    data.encode() if data else None)
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target} ({fstype}): {os.strerror(errno)}")


def umount(target: str) -> None:
    import ctypes

    libc = _libc()
    if libc.umount2(target.encode(), MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"umount {target}: {os.strerror(errno)}")


def split_options(options: list[str]) -> tuple[int, str]:
    """mount(8)-style options -> (MS_* flags, filesystem data string)."""
    flags, data = 0, []
    for opt in options:
        for item in opt.split(","):
            if not item:
                continue
            if item in _FLAG_OPTIONS:
                flags |= _FLAG_OPTIONS[item]
            else:
                data.append(item)
    return flags, ",".join(data)


def mount_storage(s: Storage) -> None:
    """Mount one storage at its mount_point (created if missing)."""
    if s.driver not in DRIVERS:
        raise InvalidArgument(f"storage driver {s.driver!r} is not supported (have {', '.join(DRIVERS)})")
    if not s.mount_point.startswith("/") or "/../" in s.mount_point + "/":
        raise InvalidArgument(f"storage mount_point must be an absolute path: {s.mount_point!r}")
    flags, data = split_options(s.options)
    source, fstype = s.source, s.fstype
    if s.driver == "virtio-fs":
        if not source:
            raise InvalidArgument("virtio-fs storage needs the tag as source")
        fstype = "virtiofs"
    elif s.driver in ("ephemeral", "tmpfs"):
        source, fstype = source or "tmpfs", "tmpfs"
    elif s.driver in ("local", "bind"):
        if not os.path.exists(source):
            raise InvalidArgument(f"bind storage source {source!r} does not exist")
        flags |= MS_BIND | MS_REC
        fstype = ""
    else:  # blk, mmioblk
        if not fstype:
            raise InvalidArgument(f"block storage {source!r} needs an fstype")
        _wait_for_device(source)
    os.makedirs(s.mount_point, exist_ok=True)
    try:
        mount(source, s.mount_point, fstype or None, flags & ~MS_RDONLY if flags & MS_BIND else flags, data)
        if flags & MS_BIND and flags & MS_RDONLY:
            # A bind mount ignores MS_RDONLY; read-only needs a remount (mount(2) "MS_BIND").
            mount("", s.mount_point, None, MS_REMOUNT | MS_BIND | MS_RDONLY, "")
    except OSError as exc:
        raise Internal(str(exc.strerror)) from None


def _wait_for_device(path: str) -> None:
    if not path.startswith("/dev/"):
        raise InvalidArgument(f"block storage source must be a /dev path, got {path!r}")
    deadline = time.monotonic() + DEVICE_WAIT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise FailedPrecondition(f"block device {path} did not appear within {DEVICE_WAIT_S:.0f}s")
        time.sleep(0.05)
