"""FUSE request handlers serving a host directory (the virtiofsd "passthrough" model, in Python).

``FuseServer.handle(request, writer)`` takes one parsed request and returns
the reply body (or writes READ data straight into the chain's guest memory).
Every syscall is relative to an inode's O_PATH fd (see inodes.py); names are
resolved and inodes re-opened only through resolve.py; errors become
``-errno`` replies.  New files get the caller's uid/gid.  How each request is
kept inside the share: docs/virtio.md, "Confinement of the file server".
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from dataclasses import dataclass

from katapy import log
from katapy.vmm.virtio.fs import fuse as F
from katapy.vmm.virtio.fs.inodes import Inode, InodeTable, check_name
from katapy.vmm.virtio.fs.resolve import GUEST_OPEN_FLAGS, open_beneath, proc_path, reopen
from katapy.vmm.virtio.queue import Reader, Writer

_log = log.get("vmm.virtio.fs")
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
MAX_WRITE = 128 * 1024
ENTRY_TIMEOUT_S = 1
MAX_HANDLES = 65536


@dataclass
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: Reader  # what follows fuse_in_header


class NoReply(Exception):
    """FORGET/BATCH_FORGET: the kernel expects no reply."""


def _attr(st: os.stat_result) -> bytes:
    return F.ATTR.pack(st.st_ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime), int(st.st_ctime),
                       st.st_atime_ns % 10**9, st.st_mtime_ns % 10**9, st.st_ctime_ns % 10**9, st.st_mode,
                       st.st_nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_blksize, 0)


#: xattr names only the host may write (see ``FuseServer._check_guest_may_write_xattr``)
_FILE_CAPS = b"security.capability"
_TRUSTED = b"trusted."

#: character devices a guest may mknod (see ``FuseServer._check_guest_may_mknod``): the whiteout 0:0 and
#: the OCI runtime-spec's default devices but /dev/console: null, zero, full, random, urandom, tty, ptmx
_HARMLESS_CHAR_DEVICES = frozenset({(0, 0), (1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)})


def _cstr(raw: bytes) -> tuple[bytes, bytes]:
    """Split off one NUL-terminated string."""
    i = raw.find(b"\0")
    if i < 0:
        raise OSError(errno.EINVAL, "unterminated name")
    return raw[:i], raw[i + 1 :]


def _ctypes_check(rc: int) -> None:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FuseServer:
    def __init__(self, shared_dir: str):
        self.shared_dir = shared_dir
        self.inodes = InodeTable(shared_dir)
        self._handles: dict[int, int] = {}  # fh -> fd
        self._dirs: dict[int, list[tuple[str, int, int]]] = {}  # fh -> [(name, ino, d_type)]
        self._next_fh = 1
        self.initialized = False
        self._ops = {
            F.INIT: self.init, F.DESTROY: self.destroy, F.LOOKUP: self.lookup, F.FORGET: self.forget,
            F.BATCH_FORGET: self.batch_forget, F.GETATTR: self.getattr, F.SETATTR: self.setattr,
            F.READLINK: self.readlink, F.SYMLINK: self.symlink, F.MKNOD: self.mknod, F.MKDIR: self.mkdir,
            F.UNLINK: self.unlink, F.RMDIR: self.rmdir, F.RENAME: self.rename, F.RENAME2: self.rename2,
            F.LINK: self.link, F.OPEN: self.open, F.READ: self.read, F.WRITE: self.write, F.STATFS: self.statfs,
            F.RELEASE: self.release, F.FSYNC: self.fsync, F.FLUSH: self.flush, F.OPENDIR: self.opendir,
            F.READDIR: self.readdir, F.READDIRPLUS: self.readdirplus, F.RELEASEDIR: self.releasedir,
            F.FSYNCDIR: self.fsyncdir, F.CREATE: self.create, F.FALLOCATE: self.fallocate, F.LSEEK: self.lseek,
            F.ACCESS: self.access, F.SETXATTR: self.setxattr, F.GETXATTR: self.getxattr,
            F.LISTXATTR: self.listxattr, F.REMOVEXATTR: self.removexattr, F.INTERRUPT: self.interrupt,
            F.SYNCFS: self.syncfs,
        }

    def close(self) -> None:
        self.destroy(None)  # type: ignore[arg-type]
        self.inodes.close()

    # -- dispatch ---------------------------------------------------------------
    def handle(self, req: Request, out: Writer) -> bytes | int:
        """The reply body, or the number of bytes already written after the out header (READ)."""
        op = self._ops.get(req.opcode)
        if op is None:
            raise OSError(errno.ENOSYS, f"opcode {req.opcode}")
        if not self.initialized and req.opcode != F.INIT:
            raise OSError(errno.EIO, "request before INIT")
        if req.opcode in (F.READ, F.READDIR, F.READDIRPLUS, F.GETXATTR, F.LISTXATTR):
            return op(req, out)
        return op(req)

    def _struct(self, req: Request, s) -> tuple:
        try:
            return s.unpack(req.body.read_exact(s.size))
        except EOFError:
            raise OSError(errno.EINVAL, "request body too short") from None

    def _names(self, req: Request, limit: int = 2 * 4096 + 2) -> bytes:
        return req.body.read(limit)

    def _entry(self, node: Inode, st: os.stat_result) -> bytes:
        return F.ENTRY_OUT_HEAD.pack(node.nodeid, 0, ENTRY_TIMEOUT_S, ENTRY_TIMEOUT_S, 0, 0) + _attr(st)

    def _fd(self, fh: int) -> int:
        fd = self._handles.get(fh)
        if fd is None:
            raise OSError(errno.EBADF, f"unknown file handle {fh}")
        return fd

    def _new_handle(self, fd: int) -> int:
        if len(self._handles) + len(self._dirs) >= MAX_HANDLES:
            os.close(fd)
            raise OSError(errno.ENFILE, "too many open files on the share")
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = fd
        return fh

    def _own(self, parent: Inode, name: str, req: Request) -> None:
        if req.uid or req.gid:
            os.chown(name, req.uid, req.gid, dir_fd=parent.fd, follow_symlinks=False)

    def _new_entry(self, req: Request, parent: Inode, name: bytes) -> bytes:
        self._own(parent, os.fsdecode(name), req)
        node, st = self.inodes.lookup(parent, name)
        return self._entry(node, st)

    # -- session ----------------------------------------------------------------
    def init(self, req: Request) -> bytes:
        major, minor, max_readahead, flags = self._struct(req, F.INIT_IN)
        if major != F.KERNEL_VERSION:
            _log.warning("fuse: unsupported protocol major", major=major)
            return F.INIT_OUT.pack(F.KERNEL_VERSION, F.KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        want = F.ASYNC_READ | F.BIG_WRITES | F.DO_READDIRPLUS | F.READDIRPLUS_AUTO | F.PARALLEL_DIROPS | F.ATOMIC_O_TRUNC
        self.initialized = True
        _log.info("fuse session initialised", kernel=f"{major}.{minor}", flags=hex(flags & want))
        return F.INIT_OUT.pack(F.KERNEL_VERSION, min(minor, F.KERNEL_MINOR_VERSION), max_readahead, flags & want,
                               16, 12, MAX_WRITE, 1, 0, 0, 0)

    def destroy(self, req: Request) -> bytes:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._dirs.clear()
        self.initialized = False
        return b""

    def interrupt(self, req: Request) -> bytes:
        raise NoReply()  # requests run to completion; nothing to interrupt

    # -- names ------------------------------------------------------------------
    def lookup(self, req: Request) -> bytes:
        name, _ = _cstr(self._names(req))
        node, st = self.inodes.lookup(self.inodes.get(req.nodeid), name)
        return self._entry(node, st)

    def forget(self, req: Request) -> bytes:
        (n,) = self._struct(req, F.FORGET_IN)
        self.inodes.forget(req.nodeid, n)
        raise NoReply()

    def batch_forget(self, req: Request) -> bytes:
        count, _ = self._struct(req, F.BATCH_FORGET_IN)
        for _ in range(min(count, 65536)):
            raw = req.body.read(F.FORGET_ONE.size)
            if len(raw) < F.FORGET_ONE.size:
                break
            nodeid, n = F.FORGET_ONE.unpack(raw)
            self.inodes.forget(nodeid, n)
        raise NoReply()

    @staticmethod
    def _check_guest_may_mknod(mode: int, rdev: int) -> None:
        """Device nodes from the guest: only those every host user may open anyway, and the whiteout.

        The server never opens a device node (``resolve.reopen``), but the node stays in a host
        directory: a ``c 1 1`` mode 0666 there is the host's physical memory to any host process or
        user that can reach it, and a ``nodev`` mount of the share would not help, as the same inode
        may be reachable through another mount of its file system.  So a block device is refused, and
        a character device unless it is one of :data:`_HARMLESS_CHAR_DEVICES` (the host has them in
        /dev, mode 0666, for everyone) or 0:0, which is no device (opening it is ENXIO) and is what
        overlayfs in the guest, and RENAME_WHITEOUT, use for whiteouts.  FIFOs, sockets and regular
        files may be made: the server refuses to open the first two.
        """
        dev = os.major(rdev), os.minor(rdev)
        if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) and dev not in _HARMLESS_CHAR_DEVICES:
            kind = "block" if stat.S_ISBLK(mode) else "character"
            raise OSError(errno.EPERM, f"mknod of {kind} device {dev[0]}:{dev[1]}")

    def mknod(self, req: Request) -> bytes:
        mode, rdev, umask, _ = self._struct(req, F.MKNOD_IN)
        name, _ = _cstr(self._names(req))
        parent = self.inodes.get(req.nodeid)
        self._check_guest_may_mknod(mode, rdev)
        os.mknod(check_name(name), mode & ~umask, rdev, dir_fd=parent.fd)
        return self._new_entry(req, parent, name)

    def mkdir(self, req: Request) -> bytes:
        mode, umask = self._struct(req, F.MKDIR_IN)
        name, _ = _cstr(self._names(req))
        parent = self.inodes.get(req.nodeid)
        os.mkdir(check_name(name), mode & ~umask & 0o7777, dir_fd=parent.fd)
        return self._new_entry(req, parent, name)

    def symlink(self, req: Request) -> bytes:
        name, rest = _cstr(self._names(req))
        target, _ = _cstr(rest)
        parent = self.inodes.get(req.nodeid)
        os.symlink(target, check_name(name), dir_fd=parent.fd)  # the target is data, never resolved here
        return self._new_entry(req, parent, name)

    def unlink(self, req: Request) -> bytes:
        name, _ = _cstr(self._names(req))
        os.unlink(check_name(name), dir_fd=self.inodes.get(req.nodeid).fd)
        return b""

    def rmdir(self, req: Request) -> bytes:
        name, _ = _cstr(self._names(req))
        os.rmdir(check_name(name), dir_fd=self.inodes.get(req.nodeid).fd)
        return b""

    def rename(self, req: Request) -> bytes:
        (newdir,) = self._struct(req, F.RENAME_IN)
        return self._rename(req, newdir, 0)

    def rename2(self, req: Request) -> bytes:
        newdir, flags, _ = self._struct(req, F.RENAME2_IN)
        return self._rename(req, newdir, flags)

    def _rename(self, req: Request, newdir: int, flags: int) -> bytes:
        old, rest = _cstr(self._names(req))
        new, _ = _cstr(rest)
        src, dst = self.inodes.get(req.nodeid), self.inodes.get(newdir)
        if flags & ~7:
            raise OSError(errno.EINVAL, "unknown rename flags")
        _ctypes_check(_libc.renameat2(src.fd, os.fsencode(check_name(old)), dst.fd, os.fsencode(check_name(new)),
                                      ctypes.c_uint(flags)))
        return b""

    def link(self, req: Request) -> bytes:
        (oldnode,) = self._struct(req, F.LINK_IN)
        name, _ = _cstr(self._names(req))
        target, parent = self.inodes.get(oldnode), self.inodes.get(req.nodeid)
        if stat.S_ISDIR(target.mode):
            raise OSError(errno.EPERM, "hard link to a directory")
        _ctypes_check(_libc.linkat(target.fd, b"", parent.fd, os.fsencode(check_name(name)), AT_EMPTY_PATH))
        node, st = self.inodes.lookup(parent, name)
        return self._entry(node, st)

    def readlink(self, req: Request) -> bytes:
        node = self.inodes.get(req.nodeid)
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        return os.fsencode(os.readlink("", dir_fd=node.fd))

    # -- attributes -------------------------------------------------------------
    def getattr(self, req: Request) -> bytes:
        st = os.fstat(self.inodes.get(req.nodeid).fd)
        return F.ATTR_OUT_HEAD.pack(ENTRY_TIMEOUT_S, 0, 0) + _attr(st)

    def setattr(self, req: Request) -> bytes:
        (valid, _, fh, size, _lo, atime, mtime, _ct, atime_ns, mtime_ns, _ctn, mode, _u4, uid, gid,
         _u5) = self._struct(req, F.SETATTR_IN)
        node = self.inodes.get(req.nodeid)
        is_link = stat.S_ISLNK(node.mode)
        if valid & F.FATTR_MODE:
            if is_link:
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
            os.chmod(proc_path(node.fd), mode & 0o7777)
        if valid & (F.FATTR_UID | F.FATTR_GID):
            _ctypes_check(_libc.fchownat(node.fd, b"", ctypes.c_uint(uid if valid & F.FATTR_UID else 0xFFFFFFFF),
                                         ctypes.c_uint(gid if valid & F.FATTR_GID else 0xFFFFFFFF),
                                         AT_EMPTY_PATH))
        if valid & F.FATTR_SIZE:
            if valid & F.FATTR_FH and fh in self._handles:
                os.ftruncate(self._handles[fh], size)
            elif stat.S_ISREG(node.mode):
                os.truncate(proc_path(node.fd), size)
            else:
                raise OSError(errno.EINVAL, "truncate of a non-regular file")
        if valid & (F.FATTR_ATIME | F.FATTR_MTIME | F.FATTR_ATIME_NOW | F.FATTR_MTIME_NOW) and not is_link:
            st = os.fstat(node.fd)
            a = (time_ns_now() if valid & F.FATTR_ATIME_NOW else atime * 10**9 + atime_ns) \
                if valid & (F.FATTR_ATIME | F.FATTR_ATIME_NOW) else st.st_atime_ns
            m = (time_ns_now() if valid & F.FATTR_MTIME_NOW else mtime * 10**9 + mtime_ns) \
                if valid & (F.FATTR_MTIME | F.FATTR_MTIME_NOW) else st.st_mtime_ns
            os.utime(proc_path(node.fd), ns=(a, m))
        return self.getattr(req)

    def access(self, req: Request) -> bytes:
        mask, _ = self._struct(req, F.ACCESS_IN)
        node = self.inodes.get(req.nodeid)
        st = os.fstat(node.fd)
        if req.uid == 0:
            if mask & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                raise OSError(errno.EACCES, "no execute bit")
            return b""
        bits = st.st_mode >> (6 if req.uid == st.st_uid else 3 if req.gid == st.st_gid else 0) & 7
        if mask & bits != mask & 7:
            raise OSError(errno.EACCES, "permission denied")
        return b""

    def statfs(self, req: Request) -> bytes:
        s = os.fstatvfs(self.inodes.get(req.nodeid).fd)
        return F.KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax,
                              s.f_frsize, 0)

    # -- xattrs -----------------------------------------------------------------
    def _xattr_path(self, req: Request) -> str:
        node = self.inodes.get(req.nodeid)
        if not (stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode)):
            raise OSError(errno.EPERM, "xattrs only on regular files and directories")
        return proc_path(node.fd)

    @staticmethod
    def _check_guest_may_write_xattr(name: bytes) -> None:
        """File capabilities and the trusted namespace are the host's to set (xattr(7)).

        A file the guest leaves in a shared directory must not carry, on the host, privileges the
        guest gave it: ``security.capability`` would grant capabilities to whoever runs it there, and
        ``trusted.*`` (CAP_SYS_ADMIN's) is where overlayfs keeps its layer metadata.  Kata's
        virtiofsd refuses more by default (all xattrs); ``user.*``, ACLs and other ``security.*``
        names (SELinux labels) still pass through.
        """
        if name == _FILE_CAPS or name.startswith(_TRUSTED):
            raise OSError(errno.EPERM, f"xattr {name!r} is not the guest's to set")

    def setxattr(self, req: Request) -> bytes:
        size, flags = self._struct(req, F.SETXATTR_IN)
        name, rest = _cstr(self._names(req, 255 + 1 + 65536))
        if size > len(rest):
            raise OSError(errno.EINVAL, "xattr value shorter than its size")
        self._check_guest_may_write_xattr(name)
        os.setxattr(self._xattr_path(req), name, rest[:size], flags)
        return b""

    def getxattr(self, req: Request, out: Writer) -> bytes:
        size, _ = self._struct(req, F.GETXATTR_IN)
        name, _ = _cstr(self._names(req, 256))
        if name.startswith(_TRUSTED):  # the host's metadata: as if absent, as for an unprivileged reader
            raise OSError(errno.ENODATA, "no such xattr")
        value = os.getxattr(self._xattr_path(req), name)
        return self._sized(value, size)

    def listxattr(self, req: Request, out: Writer) -> bytes:
        size, _ = self._struct(req, F.GETXATTR_IN)
        names = b"".join(n + b"\0" for n in map(os.fsencode, os.listxattr(self._xattr_path(req)))
                         if not n.startswith(_TRUSTED))
        return self._sized(names, size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return F.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return value

    def removexattr(self, req: Request) -> bytes:
        name, _ = _cstr(self._names(req, 256))
        self._check_guest_may_write_xattr(name)
        os.removexattr(self._xattr_path(req), name)
        return b""

    # -- files ------------------------------------------------------------------
    def open(self, req: Request) -> bytes:
        flags, _ = self._struct(req, F.OPEN_IN)
        fd = reopen(self.inodes.get(req.nodeid).fd, flags)  # regular files and directories only
        return F.OPEN_OUT.pack(self._new_handle(fd), 0, 0)

    def _open_existing(self, parent: Inode, name: str, flags: int) -> int:
        """Open an existing ``name`` as OPEN would: through an O_PATH fd whose type is checked first."""
        path_fd = open_beneath(parent.fd, name, os.O_PATH)
        try:
            return reopen(path_fd, flags)
        finally:
            os.close(path_fd)

    def create(self, req: Request) -> bytes:
        flags, mode, umask, _ = self._struct(req, F.CREATE_IN)
        name, _ = _cstr(self._names(req))
        parent = self.inodes.get(req.nodeid)
        checked = check_name(name)
        try:  # O_EXCL first: O_CREAT alone would open an existing FIFO or device node (see resolve.reopen)
            fd = open_beneath(parent.fd, checked, (flags & GUEST_OPEN_FLAGS) | os.O_CREAT | os.O_EXCL,
                              mode & ~umask & 0o7777)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd = self._open_existing(parent, checked, flags)
        fh = self._new_handle(fd)
        try:
            entry = self._new_entry(req, parent, name)
        except OSError:
            os.close(self._handles.pop(fh))
            raise
        return entry + F.OPEN_OUT.pack(fh, 0, 0)

    def read(self, req: Request, out: Writer) -> int:
        fh, offset, size, *_ = self._struct(req, F.READ_IN)
        fd = self._fd(fh)
        views = out.slices(min(size, out.available(), MAX_WRITE * 8))
        try:
            return os.preadv(fd, views, offset) if views else 0
        finally:
            for v in views:
                v.release()

    def write(self, req: Request) -> bytes:
        fh, offset, size, *_ = self._struct(req, F.WRITE_IN)
        fd = self._fd(fh)
        if size > req.body.available():
            raise OSError(errno.EINVAL, "write size exceeds the data sent")
        views = req.body.slices(size)
        try:
            n = os.pwritev(fd, views, offset) if views else 0
        finally:
            for v in views:
                v.release()
        return F.WRITE_OUT.pack(n, 0)

    def release(self, req: Request) -> bytes:
        fh, *_ = self._struct(req, F.RELEASE_IN)
        self._dirs.pop(fh, None)  # a directory handle may come back by RELEASE too: drop its listing
        fd = self._handles.pop(fh, None)
        if fd is not None:
            os.close(fd)
        return b""

    def flush(self, req: Request) -> bytes:
        fh, *_ = self._struct(req, F.FLUSH_IN)
        self._fd(fh)
        return b""

    def fsync(self, req: Request) -> bytes:
        fh, flags, _ = self._struct(req, F.FSYNC_IN)
        fd = self._fd(fh)
        (os.fdatasync if flags & 1 else os.fsync)(fd)
        return b""

    def fsyncdir(self, req: Request) -> bytes:
        self._struct(req, F.FSYNC_IN)
        return b""

    def syncfs(self, req: Request) -> bytes:
        """syncfs(2) of the share's file system only, not sync(2) of every file system on the host."""
        fd = reopen(self.inodes.root.fd, os.O_RDONLY)
        try:
            _ctypes_check(_libc.syncfs(fd))
        finally:
            os.close(fd)
        return b""

    def fallocate(self, req: Request) -> bytes:
        fh, offset, length, mode, _ = self._struct(req, F.FALLOCATE_IN)
        _ctypes_check(_libc.fallocate(self._fd(fh), ctypes.c_int(mode), ctypes.c_long(offset),
                                      ctypes.c_long(length)))
        return b""

    def lseek(self, req: Request) -> bytes:
        fh, offset, whence, _ = self._struct(req, F.LSEEK_IN)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "lseek whence")
        return F.LSEEK_OUT.pack(os.lseek(self._fd(fh), offset, whence))

    # -- directories ------------------------------------------------------------
    def opendir(self, req: Request) -> bytes:
        self._struct(req, F.OPEN_IN)
        node = self.inodes.get(req.nodeid)
        if not stat.S_ISDIR(node.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        fd = reopen(node.fd, os.O_RDONLY)
        fh = self._new_handle(fd)
        self._dirs[fh] = []
        return F.OPEN_OUT.pack(fh, 0, 0)

    def _dir_entries(self, fh: int, offset: int) -> list[tuple[str, int, int]]:
        fd = self._fd(fh)
        if fh not in self._dirs:
            raise OSError(errno.EBADF, "not a directory handle")
        if offset == 0 or not self._dirs[fh]:
            with os.scandir(fd) as it:  # a snapshot per pass: offsets are indexes into it
                self._dirs[fh] = [(e.name, e.inode(), _dtype(e)) for e in it]
        return self._dirs[fh]

    def readdir(self, req: Request, out: Writer) -> bytes:
        fh, offset, size, *_ = self._struct(req, F.READ_IN)
        entries = self._dir_entries(fh, offset)
        buf = bytearray()
        for i in range(offset, len(entries)):
            name, ino, typ = entries[i]
            d = F.dirent(ino, i + 1, typ, os.fsencode(name))
            if len(buf) + len(d) > size:
                break
            buf += d
        return bytes(buf)

    def readdirplus(self, req: Request, out: Writer) -> bytes:
        fh, offset, size, *_ = self._struct(req, F.READ_IN)
        entries = self._dir_entries(fh, offset)
        parent = self.inodes.get(req.nodeid)
        buf = bytearray()
        for i in range(offset, len(entries)):
            name, ino, typ = entries[i]
            d = F.dirent(ino, i + 1, typ, os.fsencode(name))
            if len(buf) + F.ENTRY_OUT_HEAD.size + F.ATTR.size + len(d) > size:
                break
            try:
                node, st = self.inodes.lookup(parent, os.fsencode(name))
                entry = self._entry(node, st)
            except OSError:  # vanished since the snapshot: a negative entry
                entry = bytes(F.ENTRY_OUT_HEAD.size + F.ATTR.size)
            buf += entry + d
        return bytes(buf)

    def releasedir(self, req: Request) -> bytes:
        return self.release(req)


def _dtype(e: os.DirEntry) -> int:
    try:
        if e.is_symlink():
            return 10
        if e.is_dir(follow_symlinks=False):
            return 4
        if e.is_file(follow_symlinks=False):
            return 8
    except OSError:
        pass
    return 0


def time_ns_now() -> int:
    return time.time_ns()
