"""Opening names and inodes without leaving the share: openat2(2) and the /proc/self/fd re-open.

The file server names things in two ways only, and this module is both:

* a *name* under a directory it holds (LOOKUP, CREATE): :func:`open_beneath`
  calls openat2(2) (Linux 5.6) with ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
  | RESOLVE_NO_SYMLINKS`` and ``O_NOFOLLOW``.  The kernel then refuses, for
  the whole walk, an absolute name, a ``..`` that climbs above the directory,
  any symlink (a trailing one with ``O_PATH | O_NOFOLLOW`` is returned as
  itself, never followed) and any /proc magic link.  The caller's own check
  (one component, no ``/``, ``.``, ``..``: ``inodes.check_name``) already
  rules these out; openat2 makes the kernel say so too, so one bug in that
  check is not an escape.
* an *inode* it already holds as an ``O_PATH`` fd (OPEN, OPENDIR, CREATE of an
  existing file, SYNCFS): :func:`reopen` opens ``/proc/self/fd/N``.  That is a
  magic link to the very file behind fd N, not a path that could have moved;
  when fd N is an ``O_PATH | O_NOFOLLOW`` fd of a symlink the walk stops at the
  symlink itself (its target is not followed; open(2) of it is ELOOP).  The
  re-open is still refused for anything but a regular file or a directory,
  checked on the fd's own inode first (see :func:`reopen`); /proc/self/fd is
  checked to be procfs when the server starts (:func:`check_host`).  chmod,
  utimes, truncate and the xattr calls use the same :func:`proc_path`.

``struct open_how`` is include/uapi/linux/openat2.h's; the syscall number is
437 on x86_64 and arm64 alike (the unified table from 424 on).
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat

SYS_OPENAT2 = 437

# include/uapi/linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

#: how the server resolves a guest's name under a directory it holds
BENEATH = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS

PROC_SUPER_MAGIC = 0x9FA0
PROC_FD = "/proc/self/fd"

#: the guest's open(2) flags the server passes on; the others are dropped (O_CREAT, O_EXCL, O_PATH,
#: O_TMPFILE, O_DIRECTORY, O_NOFOLLOW, O_NOCTTY are the server's to choose, and openat2 refuses bits
#: it does not know, such as the kernel-internal __FMODE_EXEC a FUSE client may pass along)
GUEST_OPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC | os.O_DIRECT
                    | os.O_NOATIME | os.O_TRUNC)

_RETRIES = 16  # openat2 answers EAGAIN when a rename raced a RESOLVE_BENEATH walk


class OpenHow(ctypes.Structure):
    """``struct open_how { __u64 flags; __u64 mode; __u64 resolve; }``"""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Openat2Unavailable(OSError):
    """openat2(2) is missing (ENOSYS: a kernel before 5.6) or refused (EPERM: a seccomp profile that does
    not know it), so the share cannot be confined and is not served."""


_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # an instance of our own: argtypes set here stay here
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(OpenHow), ctypes.c_size_t]
_statfs = _libc.statfs
_statfs.restype = ctypes.c_int
_statfs.argtypes = [ctypes.c_char_p, ctypes.c_char_p]


def openat2(dirfd: int, name: str | bytes, flags: int, mode: int = 0, resolve: int = BENEATH) -> int:
    """openat2(2): a new fd, or OSError; ENOSYS becomes :class:`Openat2Unavailable`."""
    how = OpenHow(flags, mode, resolve)
    raw = os.fsencode(name)
    for _ in range(_RETRIES):
        fd = _syscall(SYS_OPENAT2, dirfd, raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        e = ctypes.get_errno()
        if e == errno.ENOSYS:
            raise Openat2Unavailable(e, "openat2(2) is not available (Linux 5.6 or later is needed): the "
                                        "virtio-fs server cannot confine name resolution to its share")
        if e not in (errno.EINTR, errno.EAGAIN):
            raise OSError(e, os.strerror(e), os.fsdecode(raw))
    raise OSError(errno.EAGAIN, "openat2: resolution kept racing a rename", os.fsdecode(raw))


def open_beneath(dirfd: int, name: str, flags: int, mode: int = 0) -> int:
    """Open ``name`` under ``dirfd`` without following any symlink or leaving ``dirfd``."""
    return openat2(dirfd, name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, BENEATH)


_procfs_checked = False


def _check_procfs() -> None:
    """``/proc/self/fd`` must be procfs's, or a "magic link" there could be any file."""
    global _procfs_checked
    if _procfs_checked:
        return
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type is its first long
    if _statfs(PROC_FD.encode(), buf) < 0 or int.from_bytes(buf.raw[:8], "little") != PROC_SUPER_MAGIC:
        raise OSError(errno.EXDEV, f"{PROC_FD} is not procfs: the virtio-fs server cannot re-open its inodes")
    _procfs_checked = True


def check_host(dirfd: int) -> None:
    """What the server needs from the kernel, checked once when it starts rather than at the guest's
    first request: openat2(2) (:class:`Openat2Unavailable` if missing) and procfs at /proc."""
    try:
        os.close(openat2(dirfd, ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError as e:
        if e.errno != errno.EPERM:  # EPERM here: a seccomp profile (a container's) refusing syscalls it does not know
            raise
        raise Openat2Unavailable(e.errno, "openat2(2) is refused here (EPERM, a seccomp profile?): the "
                                          "virtio-fs server cannot confine name resolution to its share") from None
    _check_procfs()


def proc_path(fd: int) -> str:
    """``/proc/self/fd/N``: the magic link to the very inode behind ``fd``, never a path that could have
    moved.  Only for a regular file or a directory (see :func:`reopen`); for a symlink's O_PATH fd the
    walk would stop at the symlink itself, never at its target."""
    return f"{PROC_FD}/{fd}"


def reopen(path_fd: int, flags: int) -> int:
    """A new open file description for the inode behind the ``O_PATH`` fd ``path_fd``.

    Only regular files and directories are opened on the host, checked on the fd's inode itself (its
    type never changes).  A Linux guest opens FIFOs, sockets and device nodes on a FUSE mount itself and
    never sends FUSE_OPEN for them; a hostile one that did would block the device loop in open(2) on a
    FIFO, or get a host device behind a node in the share.  ``flags`` are the guest's, filtered by
    :data:`GUEST_OPEN_FLAGS`.
    """
    mode = os.fstat(path_fd).st_mode
    if stat.S_ISLNK(mode):
        raise OSError(errno.ELOOP, "open of a symlink")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OSError(errno.EPERM, f"open of a special file (mode {mode:#o})")
    return os.open(proc_path(path_fd), (flags & GUEST_OPEN_FLAGS) | os.O_CLOEXEC)
