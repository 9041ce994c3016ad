"""mount(2)/umount2(2) through libc, and /proc/self/mountinfo queries.

Python's os module has no mount call; the resource manager needs bind,
overlay and tmpfs mounts and lazy unmounts (mount(2), umount(2) man pages).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

#: mount option words that are flags rather than fs data (mount(8) "FILESYSTEM-INDEPENDENT MOUNT OPTIONS")
_FLAG_OPTIONS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "bind": MS_BIND, "rbind": MS_BIND | MS_REC,
}
_IGNORED_OPTIONS = {"rw", "suid", "dev", "exec", "rprivate", "private", "rslave", "slave", "rshared", "shared"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(OSError):
    """A mount or unmount failed; the message names the call."""


def split_options(options: list[str] | tuple[str, ...]) -> tuple[int, str]:
    """Split mount options into (MS_* flags, comma-joined fs data)."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[opt]
        elif opt in _IGNORED_OPTIONS:
            continue
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str, target: Path, fstype: str, flags: int = 0, data: str = "") -> None:
    rc = _libc.mount(source.encode(), os.fsencode(target), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount {fstype or 'bind'} {source} on {target} (data {data!r}): {os.strerror(err)}")


def bind(source: Path, target: Path, read_only: bool = False, recursive: bool = True) -> None:
    """Bind ``source`` on ``target``; read-only binds need a second remount (mount(2) MS_BIND notes)."""
    mount(os.fspath(source), target, "", MS_BIND | (MS_REC if recursive else 0))
    if read_only:
        mount("", target, "", MS_BIND | MS_REMOUNT | MS_RDONLY)


def unmount(target: Path) -> None:
    """Lazily detach ``target`` (MNT_DETACH); a path that is not a mount point is fine."""
    rc = _libc.umount2(os.fsencode(target), MNT_DETACH)
    if rc != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise MountError(err, f"umount {target}: {os.strerror(err)}")


def mount_points_under(root: Path) -> list[Path]:
    """Mount points at or below ``root`` from /proc/self/mountinfo, deepest first."""
    prefix = os.fspath(root).rstrip("/")
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5:
                continue
            point = fields[4].encode().decode("unicode_escape")  # octal escapes like \040
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_all_under(root: Path) -> None:
    """Detach every mount at or below ``root``, deepest first."""
    for point in mount_points_under(root):
        unmount(point)
