"""A hostile guest against the virtio-fs passthrough: nothing outside the share is read, changed or made.

Every test drives the server through the real FUSE request path (``FsHarness`` from test_fs_unit.py:
hand-built requests on a real virtqueue) with this layout under ``tmp_path``::

    share/          the exported directory (node 1)
      sub/
    outside/        next to the share: the guest must never reach it
      secret        unique content, an xattr ``user.mark``

Two detectors run in every test: ``Env.assert_untouched()`` compares a snapshot of everything under
``tmp_path`` but ``share/`` (names, types, sizes, times, owners, link counts, contents, xattrs) with the one
taken before the guest's first request, so anything made, removed, written, truncated, chmod'ed, chown'ed or
touched outside fails the test; and every reply body the server sent is scanned for the secret's content and
for the secret's and ``outside``'s inode numbers, so anything *read* or *stat'ed* outside fails it too.
See docs/virtio.md, "Confinement of the file server", for the vector-by-vector table.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import sys
import threading

import pytest

from katapy.vmm.virtio.fs import fuse as F
from katapy.vmm.virtio.fs import resolve

from .test_fs_unit import FsHarness, _call_unblocking_fifo

ROOT = 1
SECRET = b"TOP-SECRET-" + os.urandom(8).hex().encode()
MARK = b"outside-mark-" + os.urandom(8).hex().encode()  # the secret's user.mark xattr
IS_ROOT = os.geteuid() == 0
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


class RecordingHarness(FsHarness):
    """FsHarness that keeps every reply body, for the scan in :meth:`Env.assert_untouched`."""

    def __init__(self, shared):
        super().__init__(shared)
        self.replies: list[bytes] = []

    def call(self, *args, **kw):
        err, body = super().call(*args, **kw)
        self.replies.append(body)
        return err, body


def _snapshot(top) -> dict:
    """Everything under ``top`` except ``top/share``: what the guest must never change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == str(top):
            dirnames[:] = [d for d in dirnames if d != "share"]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(p).encode()
            try:
                xattrs = {x: os.getxattr(p, x, follow_symlinks=False) for x in os.listxattr(p, follow_symlinks=False)}
            except OSError:
                xattrs = None
            out[p] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_uid, st.st_gid,
                      st.st_nlink, st.st_rdev, data, xattrs)
    out[str(top)] = sorted(os.listdir(top))
    return out


class Env:
    def __init__(self, tmp_path):
        self.top = tmp_path
        self.share = tmp_path / "share"
        self.outside = tmp_path / "outside"
        self.secret = self.outside / "secret"
        (self.share / "sub").mkdir(parents=True)
        self.outside.mkdir()
        self.secret.write_bytes(SECRET)
        os.setxattr(self.secret, "user.mark", MARK)
        self.h = RecordingHarness(self.share)
        err, _ = self.h.call(F.INIT, 0, F.INIT_IN.pack(7, 38, 0, 0) + bytes(48))
        assert err == 0
        self.before: dict | None = None

    def freeze(self) -> None:
        """Take the outside snapshot: call once the host-side setup of a test is done."""
        self.before = _snapshot(self.top)
        self.forbidden_inos = [struct.pack("<Q", os.lstat(p).st_ino) for p in (self.secret, self.outside)]

    def assert_untouched(self) -> None:
        assert self.before is not None, "freeze() was not called"
        assert _snapshot(self.top) == self.before, "something outside the share changed"
        for body in self.h.replies:
            assert SECRET not in body and MARK not in body, "the secret's content or xattr reached the guest"
            for ino in self.forbidden_inos:
                assert ino not in body, "an inode outside the share reached the guest"

    # -- requests -----------------------------------------------------------------------------
    def call(self, *args, **kw):
        return self.h.call(*args, **kw)

    def lookup(self, parent: int, name: bytes):
        return self.call(F.LOOKUP, parent, name + b"\0")

    def node(self, parent: int, name: bytes) -> tuple[int, int]:
        """(nodeid, mode) of an existing name."""
        err, body = self.lookup(parent, name)
        assert err == 0, (name, err)
        return entry_node(body), entry_mode(body)

    def open(self, node: int, flags: int):
        return self.call(F.OPEN, node, F.OPEN_IN.pack(flags, 0))

    def create(self, parent: int, name: bytes, flags: int = os.O_RDWR, mode: int = 0o644):
        return self.call(F.CREATE, parent, F.CREATE_IN.pack(flags, mode, 0, 0) + name + b"\0")

    def mkdir(self, parent: int, name: bytes):
        return self.call(F.MKDIR, parent, F.MKDIR_IN.pack(0o755, 0) + name + b"\0")

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0):
        return self.call(F.MKNOD, parent, F.MKNOD_IN.pack(mode, rdev, 0, 0) + name + b"\0")

    def symlink(self, parent: int, name: bytes, target: bytes):
        return self.call(F.SYMLINK, parent, name + b"\0" + target + b"\0")

    def link(self, old: int, parent: int, name: bytes):
        return self.call(F.LINK, parent, F.LINK_IN.pack(old) + name + b"\0")

    def rename(self, parent: int, old: bytes, newdir: int, new: bytes, flags: int = 0):
        return self.call(F.RENAME2, parent, F.RENAME2_IN.pack(newdir, flags, 0) + old + b"\0" + new + b"\0")

    def read(self, node: int, fh: int, size: int = 4096):
        return self.call(F.READ, node, F.READ_IN.pack(fh, 0, size, 0, 0, 0, 0))

    def write(self, node: int, fh: int, data: bytes):
        return self.call(F.WRITE, node, F.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0) + data)

    def release(self, node: int, fh: int):
        return self.call(F.RELEASE, node, F.RELEASE_IN.pack(fh, 0, 0, 0))

    def forget(self, node: int, n: int = 1):
        return self.call(F.FORGET, node, F.FORGET_IN.pack(n))

    def setattr(self, node: int, valid: int, *, size=0, mode=0, uid=0, gid=0, atime=0, mtime=0, fh=0):
        return self.call(F.SETATTR, node, F.SETATTR_IN.pack(valid, 0, fh, size, 0, atime, mtime, 0, 0, 0, 0, mode,
                                                            0, uid, gid, 0))

    def getxattr(self, node: int, name: bytes):
        return self.call(F.GETXATTR, node, F.GETXATTR_IN.pack(4096, 0) + name + b"\0")

    def setxattr(self, node: int, name: bytes, value: bytes):
        return self.call(F.SETXATTR, node, F.SETXATTR_IN.pack(len(value), 0) + name + b"\0" + value)


def entry_node(body: bytes) -> int:
    return struct.unpack_from("<Q", body)[0]


def entry_attr(body: bytes, at: int = F.ENTRY_OUT_HEAD.size) -> tuple:
    return F.ATTR.unpack_from(body, at)


def entry_mode(body: bytes) -> int:
    return entry_attr(body)[9]


def create_fh(body: bytes) -> int:
    return struct.unpack_from("<Q", body, F.ENTRY_OUT_HEAD.size + F.ATTR.size)[0]


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.h.close()


# -- names: '..', '/', '.', absolute paths ---------------------------------------------------------------------

def test_names_that_walk_are_refused_by_every_name_taking_request(env):
    """LOOKUP '..' at the share root, and every request that takes a name, with names that would walk:
    EINVAL (ENAMETOOLONG past 255 bytes), nothing made, removed or moved outside.

    Can fail: a server that passed these names to the *at syscalls would, for MKDIR '../x', make
    ``tmp_path/x``; for UNLINK '../outside/secret' remove the secret; for RENAME move a share file out;
    for LOOKUP '..' hand back a node of ``tmp_path`` whose attributes the reply scan catches."""
    (env.share / "f").write_bytes(b"inside")
    f, _ = env.node(ROOT, b"f")
    env.freeze()
    secret = os.fsencode(env.secret)
    bad = [b"..", b".", b"../outside", b"../outside/secret", b"../x", secret, str(env.top).encode() + b"/x",
           b"sub/../../outside", b"sub/x", b"/", b"//", b"../" * 40 + b"etc/passwd"]
    for name in bad:
        assert env.lookup(ROOT, name)[0] == -errno.EINVAL, name
        assert env.mkdir(ROOT, name)[0] == -errno.EINVAL, name
        assert env.mknod(ROOT, name, stat.S_IFREG | 0o644)[0] == -errno.EINVAL, name
        assert env.mknod(ROOT, name, stat.S_IFIFO | 0o644)[0] == -errno.EINVAL, name
        assert env.symlink(ROOT, name, b"target")[0] == -errno.EINVAL, name
        assert env.create(ROOT, name)[0] == -errno.EINVAL, name
        assert env.create(ROOT, name, os.O_RDWR | os.O_TRUNC)[0] == -errno.EINVAL, name
        assert env.call(F.UNLINK, ROOT, name + b"\0")[0] == -errno.EINVAL, name
        assert env.call(F.RMDIR, ROOT, name + b"\0")[0] == -errno.EINVAL, name
        assert env.link(f, ROOT, name)[0] == -errno.EINVAL, name
        assert env.rename(ROOT, b"f", ROOT, name)[0] == -errno.EINVAL, name
        assert env.rename(ROOT, name, ROOT, b"g")[0] == -errno.EINVAL, name
        assert env.call(F.RENAME, ROOT, F.RENAME_IN.pack(ROOT) + b"f\0" + name + b"\0")[0] == -errno.EINVAL, name
    assert env.lookup(ROOT, b"x" * 256)[0] == -errno.ENAMETOOLONG
    assert env.mkdir(ROOT, b"x" * 256)[0] == -errno.ENAMETOOLONG
    # a NUL ends the name: "sub\0/../.." is the name "sub", never a path
    node, mode = env.node(ROOT, b"sub\0/../../outside")
    assert stat.S_ISDIR(mode) and entry_attr(env.lookup(ROOT, b"sub")[1])[0] == os.lstat(env.share / "sub").st_ino
    assert sorted(os.listdir(env.share)) == ["f", "sub"]
    env.assert_untouched()


def test_lookup_under_a_non_directory_is_enotdir(env):
    (env.share / "f").write_bytes(b"inside")
    f, _ = env.node(ROOT, b"f")
    env.freeze()
    assert env.lookup(f, b"x")[0] == -errno.ENOTDIR
    assert env.mkdir(f, b"x")[0] == -errno.ENOTDIR
    assert env.create(f, b"x")[0] == -errno.ENOTDIR
    env.assert_untouched()


# -- symlinks ------------------------------------------------------------------------------------------------

def _file_links(env) -> list[bytes]:
    """Symlinks to the secret, absolute and relative, made by the host and by the guest; their names."""
    os.symlink(env.secret, env.share / "abs")
    os.symlink("../../outside/secret", env.share / "sub" / "rel")
    os.symlink("../outside/secret", env.share / "rel1")
    assert env.symlink(ROOT, b"gabs", os.fsencode(env.secret))[0] == 0
    assert env.symlink(ROOT, b"grel", b"../outside/secret")[0] == 0
    assert (env.share / "sub" / "rel").read_bytes() == SECRET  # the links do reach the secret on the host
    return [b"abs", b"sub/rel", b"rel1", b"gabs", b"grel"]


def _node_of(env, path: bytes) -> tuple[int, int]:
    parent = ROOT
    *dirs, last = path.split(b"/")
    for d in dirs:
        parent, _ = env.node(parent, d)
    return env.node(parent, last)


def test_symlinks_to_a_file_outside_are_never_followed(env):
    """Absolute and relative symlinks to the secret (host-made and guest-made): LOOKUP and GETATTR describe
    the link, OPEN and CREATE of it are ELOOP whatever the flags, truncate is EINVAL, chmod EOPNOTSUPP,
    utimes is not applied, chown changes the link only, xattr requests are EPERM, READLINK is the target
    as data, OPENDIR is ENOTDIR.

    Can fail: following any of these (a path-based open, stat, truncate, chmod, utime, chown or
    getxattr of the link) reads the secret (reply scan), or changes its size, mode, times, owner or
    xattrs (snapshot)."""
    links = _file_links(env)
    nodes = [_node_of(env, name) for name in links]
    env.freeze()
    secret_uid = os.stat(env.secret).st_uid
    for (node, mode), name in zip(nodes, links):
        assert stat.S_ISLNK(mode), name
        err, body = env.call(F.GETATTR, node, F.GETATTR_IN.pack(0, 0, 0))
        assert err == 0 and stat.S_ISLNK(entry_attr(body, F.ATTR_OUT_HEAD.size)[9]), name
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_APPEND,
                      os.O_RDONLY | os.O_NOFOLLOW, os.O_RDONLY | os.O_PATH, os.O_RDONLY | os.O_DIRECTORY):
            assert env.open(node, flags)[0] == -errno.ELOOP, (name, flags)
        assert env.call(F.OPENDIR, node, F.OPEN_IN.pack(os.O_RDONLY, 0))[0] == -errno.ENOTDIR
        assert env.setattr(node, F.FATTR_SIZE, size=0)[0] == -errno.EINVAL, name
        assert env.setattr(node, F.FATTR_MODE, mode=0o777)[0] == -errno.EOPNOTSUPP, name
        assert env.setattr(node, F.FATTR_ATIME | F.FATTR_MTIME, atime=1, mtime=1)[0] == 0, name
        assert env.setattr(node, F.FATTR_ATIME_NOW | F.FATTR_MTIME_NOW)[0] == 0, name
        err, _ = env.setattr(node, F.FATTR_UID | F.FATTR_GID, uid=4242, gid=4242)
        assert err == (0 if IS_ROOT else -errno.EPERM), name
        assert env.getxattr(node, b"user.mark")[0] == -errno.EPERM, name
        assert env.call(F.LISTXATTR, node, F.GETXATTR_IN.pack(4096, 0))[0] == -errno.EPERM, name
        assert env.setxattr(node, b"user.evil", b"1")[0] == -errno.EPERM, name
        assert env.call(F.REMOVEXATTR, node, b"user.mark\0")[0] == -errno.EPERM, name
        assert env.call(F.ACCESS, node, F.ACCESS_IN.pack(os.R_OK, 0))[0] == 0, name
        assert env.call(F.STATFS, node, b"")[0] == 0, name
        assert env.lookup(node, b"x")[0] == -errno.ENOTDIR, name
        err, target = env.call(F.READLINK, node, b"")
        assert err == 0 and target in (os.fsencode(env.secret), b"../../outside/secret", b"../outside/secret")
    # CREATE of an existing symlink's name: EEXIST with O_EXCL, ELOOP without (never O_CREAT through it)
    for name in (b"abs", b"rel1", b"gabs", b"grel"):
        assert env.create(ROOT, name, os.O_RDWR | os.O_TRUNC)[0] == -errno.ELOOP, name
        assert env.create(ROOT, name, os.O_RDWR | os.O_EXCL)[0] == -errno.EEXIST, name
    if IS_ROOT:  # chown went to the links themselves
        assert os.lstat(env.share / "abs").st_uid == 4242 and os.stat(env.secret).st_uid == secret_uid
    env.assert_untouched()


def test_symlinks_to_a_directory_outside_are_never_walked(env):
    """Symlinks to ``outside/`` (absolute, relative, guest-made) as the parent of every request that takes
    one: ENOTDIR, nothing made, removed, linked or moved there.

    Can fail: a server that resolved the parent by path, or opened it following symlinks, would look
    up the secret (reply scan) or create, unlink or rename in ``outside/`` (snapshot)."""
    os.symlink(env.outside, env.share / "absdir")
    os.symlink("../../outside", env.share / "sub" / "reldir")
    assert env.symlink(ROOT, b"greldir", b"../outside")[0] == 0
    (env.share / "f").write_bytes(b"inside")
    f, _ = env.node(ROOT, b"f")
    dirs = [_node_of(env, n)[0] for n in (b"absdir", b"sub/reldir", b"greldir")]
    env.freeze()
    for d in dirs:
        assert env.lookup(d, b"secret")[0] == -errno.ENOTDIR
        assert env.call(F.OPENDIR, d, F.OPEN_IN.pack(os.O_RDONLY, 0))[0] == -errno.ENOTDIR
        assert env.mkdir(d, b"m")[0] == -errno.ENOTDIR
        assert env.mknod(d, b"n", stat.S_IFREG | 0o644)[0] == -errno.ENOTDIR
        assert env.symlink(d, b"s", b"x")[0] == -errno.ENOTDIR
        assert env.create(d, b"c")[0] == -errno.ENOTDIR
        assert env.create(d, b"secret", os.O_RDWR | os.O_TRUNC)[0] == -errno.ENOTDIR
        assert env.call(F.UNLINK, d, b"secret\0")[0] == -errno.ENOTDIR
        assert env.call(F.RMDIR, d, b"x\0")[0] == -errno.ENOTDIR
        assert env.link(f, d, b"hl")[0] == -errno.ENOTDIR
        assert env.rename(ROOT, b"f", d, b"moved")[0] == -errno.ENOTDIR
        assert env.rename(d, b"secret", ROOT, b"stolen")[0] == -errno.ENOTDIR
        assert env.rename(ROOT, b"f", d, b"secret", RENAME_EXCHANGE)[0] == -errno.ENOTDIR
    assert (env.share / "f").read_bytes() == b"inside"
    env.assert_untouched()


def test_readdir_lists_symlinks_as_symlinks(env):
    """READDIR / READDIRPLUS of a directory holding a symlink to ``outside/``: the entry is the link
    (d_type DT_LNK, attributes S_IFLNK, the link's inode), never the directory it names.

    Can fail: an entry stat'ed through the link carries ``outside``'s inode number (reply scan) and
    S_IFDIR."""
    os.symlink(env.outside, env.share / "absdir")
    env.freeze()
    err, body = env.call(F.OPENDIR, ROOT, F.OPEN_IN.pack(os.O_RDONLY, 0))
    assert err == 0
    fh = struct.unpack_from("<Q", body)[0]
    err, plus = env.call(F.READDIRPLUS, ROOT, F.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
    assert err == 0
    found = {}
    at = 0
    while at < len(plus):
        attr = entry_attr(plus, at + F.ENTRY_OUT_HEAD.size)
        at += F.ENTRY_OUT_HEAD.size + F.ATTR.size
        ino, _, namelen, typ = F.DIRENT_HEAD.unpack_from(plus, at)
        name = plus[at + F.DIRENT_HEAD.size:at + F.DIRENT_HEAD.size + namelen]
        at += (F.DIRENT_HEAD.size + namelen + 7) & ~7
        found[name] = (typ, attr[9], attr[0])
    typ, mode, ino = found[b"absdir"]
    assert typ == 10 and stat.S_ISLNK(mode) and ino == os.lstat(env.share / "absdir").st_ino  # DT_LNK
    env.release(ROOT, fh)
    env.assert_untouched()


# -- /proc/self/fd and other magic links; file handles -----------------------------------------------------

def test_proc_magic_links_in_the_share_are_never_followed(env):
    """Symlinks into /proc (the server's own root, cwd, an fd it holds on the secret) are only data:
    LOOKUP through them is ENOTDIR, OPEN is ELOOP, LINK links the symlink itself; names spelling
    /proc/self/fd/N are EINVAL.

    Can fail: following /proc/self/fd/N reads the secret (reply scan); walking /proc/self/root lists
    the host's root; a hard link through the magic link would add a link to the secret (nlink in the
    snapshot)."""
    held = os.open(env.secret, os.O_RDONLY | os.O_CLOEXEC)  # a host fd on the secret, in this process
    try:
        root_fd = env.h.dev.server.inodes.root.fd
        os.symlink(f"/proc/self/fd/{held}", env.share / "pfd")
        os.symlink(f"/proc/{os.getpid()}/fd/{held}", env.share / "ppid")
        os.symlink("/proc/self/root", env.share / "proot")
        os.symlink("/proc/self/cwd", env.share / "pcwd")
        assert env.symlink(ROOT, b"gpfd", f"/proc/self/fd/{root_fd}".encode())[0] == 0
        nodes = {n: env.node(ROOT, n) for n in (b"pfd", b"ppid", b"proot", b"pcwd", b"gpfd")}
        env.freeze()
        for name, (node, mode) in nodes.items():
            assert stat.S_ISLNK(mode), name
            assert env.open(node, os.O_RDONLY)[0] == -errno.ELOOP, name
            assert env.open(node, os.O_RDWR | os.O_TRUNC)[0] == -errno.ELOOP, name
            assert env.lookup(node, b"etc")[0] == -errno.ENOTDIR, name
            assert env.lookup(node, b"secret")[0] == -errno.ENOTDIR, name
            assert env.create(node, b"x")[0] == -errno.ENOTDIR, name
            assert env.setattr(node, F.FATTR_SIZE, size=0)[0] == -errno.EINVAL, name
            assert env.getxattr(node, b"user.mark")[0] == -errno.EPERM, name
        for name in (f"/proc/self/fd/{held}".encode(), b"/proc/self/root", f"proc/self/fd/{root_fd}".encode()):
            assert env.lookup(ROOT, name)[0] == -errno.EINVAL
        assert env.link(nodes[b"pfd"][0], ROOT, b"hl")[0] == 0
        assert os.path.islink(env.share / "hl") and os.readlink(env.share / "hl") == f"/proc/self/fd/{held}"
        env.assert_untouched()
    finally:
        os.close(held)


def test_guest_numbers_are_never_host_fds(env):
    """Node ids and file handles are keys of the server's own tables: a guest that sends a host fd number
    (the server's fd on the share root, a test fd on the secret) as either gets ESTALE / EBADF.

    Can fail: a server that used a node id or fh as an fd would read the secret through it (reply scan)
    or act on the share's parent."""
    held = os.open(env.secret, os.O_RDWR | os.O_CLOEXEC)
    high = fcntl.fcntl(held, fcntl.F_DUPFD_CLOEXEC, 700)  # above any fh this test's server hands out
    try:
        env.freeze()
        root_fd = env.h.dev.server.inodes.root.fd
        for fd in (held, high, root_fd, 0, 1, 2):
            if fd in env.h.dev.server._handles:  # a real handle of the guest's: not a forged number
                continue
            assert env.read(ROOT, fd)[0] == -errno.EBADF, fd
            assert env.write(ROOT, fd, b"pwned")[0] == -errno.EBADF, fd
            assert env.call(F.FSYNC, ROOT, F.FSYNC_IN.pack(fd, 0, 0))[0] == -errno.EBADF, fd
            assert env.call(F.LSEEK, ROOT, F.LSEEK_IN.pack(fd, 0, os.SEEK_DATA, 0))[0] == -errno.EBADF, fd
            assert env.call(F.FALLOCATE, ROOT, F.FALLOCATE_IN.pack(fd, 0, 4096, 0, 0))[0] == -errno.EBADF, fd
        for fd in (held, high, root_fd):
            if fd in (ROOT,) or env.h.dev.server.inodes._by_id.get(fd) is not None:
                continue
            assert env.lookup(fd, b"secret")[0] == -errno.ESTALE, fd
            assert env.call(F.GETATTR, fd, F.GETATTR_IN.pack(0, 0, 0))[0] == -errno.ESTALE, fd
            assert env.open(fd, os.O_RDONLY)[0] == -errno.ESTALE, fd
            assert env.link(fd, ROOT, b"hl")[0] == -errno.ESTALE, fd
        # SETATTR(FATTR_FH) with a forged fh: never ftruncate(fh) of a host fd
        (env.share / "f").write_bytes(b"inside")
        f, _ = env.node(ROOT, b"f")
        assert env.setattr(f, F.FATTR_SIZE | F.FATTR_FH, size=0, fh=high)[0] == 0
        assert (env.share / "f").read_bytes() == b""  # the node's own file was truncated instead
        env.assert_untouched()
    finally:
        os.close(high)
        os.close(held)


# -- hard links ----------------------------------------------------------------------------------------------

def test_hard_links_stay_inside_the_share(env):
    """LINK takes its source as a node id the guest got from the share: a link to a symlink pointing at
    the secret links the symlink, and the new name goes into a share directory or nowhere.

    Can fail: linkat() following the symlink (AT_SYMLINK_FOLLOW, or a path) would give the secret a
    second name in the share (its nlink changes in the snapshot; reading the new name, the scan)."""
    os.symlink(env.secret, env.share / "abs")
    os.symlink("../outside/secret", env.share / "rel")
    abs_node, _ = env.node(ROOT, b"abs")
    rel_node, _ = env.node(ROOT, b"rel")
    sub, _ = env.node(ROOT, b"sub")
    env.freeze()
    err, body = env.link(abs_node, sub, b"hl-abs")
    assert err == 0 and stat.S_ISLNK(entry_mode(body))
    err, body = env.link(rel_node, ROOT, b"hl-rel")
    assert err == 0 and stat.S_ISLNK(entry_mode(body))
    assert os.path.islink(env.share / "sub" / "hl-abs") and os.path.islink(env.share / "hl-rel")
    assert os.lstat(env.share / "hl-rel").st_ino == os.lstat(env.share / "rel").st_ino
    hl, _ = env.node(ROOT, b"hl-rel")
    assert env.open(hl, os.O_RDONLY)[0] == -errno.ELOOP
    assert env.link(sub, ROOT, b"hl-dir")[0] == -errno.EPERM  # no hard links to directories
    assert os.stat(env.secret).st_nlink == 1
    env.assert_untouched()


# -- rename races --------------------------------------------------------------------------------------------

def _exchange(dirfd: int, a: bytes, b: bytes) -> None:
    _libc.renameat2(dirfd, a, dirfd, b, ctypes.c_uint(RENAME_EXCHANGE))


@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_rename_race_swapping_a_directory_for_a_symlink(env, target):
    """A host thread swaps, as fast as it can (renameat2 RENAME_EXCHANGE), ``share/d`` (a directory) with
    a symlink to ``outside/``, and inside ``d`` a file ``secret`` with a symlink to the real secret,
    while the guest issues 2000 rounds of LOOKUP d, LOOKUP d/secret, OPEN+READ+WRITE it, CREATE over it,
    CREATE and MKDIR new names in d.  The guest sees a directory or a symlink, never ``outside``.

    Can fail: a server that resolved ``d`` or ``d/secret`` by path, or opened either following
    symlinks, would, on any round that lands between two exchanges, read the secret (reply scan),
    write or truncate it, or make ``c<i>``/``m<i>`` in ``outside/`` (snapshot).  The test also asserts
    that both states were seen, so the race really was run."""
    share = env.share
    (share / "d").mkdir()
    (share / "d" / "secret").write_bytes(b"inside")
    os.symlink(env.outside if target == "absolute" else "../outside", share / "swap")
    os.symlink(env.secret if target == "absolute" else "../../outside/secret", share / "d" / "slink")
    env.freeze()
    stop = threading.Event()
    swaps = [0]

    def swapper():
        top = os.open(share, os.O_PATH | os.O_DIRECTORY)
        try:
            while not stop.is_set():
                _exchange(top, b"d", b"swap")
                inner = os.path.join(share, "d" if os.path.isdir(share / "d") else "swap")
                try:
                    dfd = os.open(inner, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
                except OSError:
                    continue
                _exchange(dfd, b"secret", b"slink")
                os.close(dfd)
                swaps[0] += 1
        finally:
            os.close(top)

    seen = {"dir": 0, "link": 0, "inner-file": 0, "inner-link": 0}
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    try:
        for i in range(2000):
            err, body = env.lookup(ROOT, b"d")
            if err:
                continue
            d, mode = entry_node(body), entry_mode(body)
            seen["dir" if stat.S_ISDIR(mode) else "link"] += 1
            err, body = env.lookup(d, b"secret")
            if err == 0:
                s, smode = entry_node(body), entry_mode(body)
                seen["inner-file" if stat.S_ISREG(smode) else "inner-link"] += 1
                err, body = env.open(s, os.O_RDWR)
                if err == 0:
                    fh = struct.unpack_from("<Q", body)[0]
                    env.read(s, fh)
                    env.write(s, fh, b"inside")
                    env.release(s, fh)
                env.forget(s)
            err, body = env.create(d, b"secret", os.O_RDWR | os.O_TRUNC)
            if err == 0:
                fh = create_fh(body)
                env.write(d, fh, b"inside")
                env.release(d, fh)
                env.forget(entry_node(body))
            err, body = env.create(d, f"c{i}".encode())
            if err == 0:
                env.release(d, create_fh(body))
                env.forget(entry_node(body))
            err, body = env.mkdir(d, f"m{i}".encode())
            if err == 0:
                env.forget(entry_node(body))
            env.forget(d)
    finally:
        stop.set()
        t.join(10)
        sys.setswitchinterval(old_interval)
    assert not t.is_alive()
    assert swaps[0] > 100, swaps
    assert seen["dir"] > 0 and seen["link"] > 0, seen  # the race was run: both states were seen
    assert seen["inner-file"] > 0 and seen["inner-link"] > 0, seen
    assert len(env.h.dev.server.inodes) < 20  # the forgets kept the table small: no fd per round
    env.assert_untouched()


# -- device nodes and FIFOs ----------------------------------------------------------------------------------

def test_guest_may_not_make_host_devices(env):
    """MKNOD of a block device, or of a character device such as 1:1 (/dev/mem) or 5:1 (the host's
    console), is EPERM and leaves nothing in the share; the devices every host user may open anyway
    (null, zero, full, random, urandom, tty, ptmx) and the whiteout 0:0 may be made, and are never
    opened by the server.

    Can fail: a server passing these to mknodat would leave ``mem`` (a c 1:1 node the host's users could
    open) in the share; one opening device nodes would answer OPEN with a handle."""
    env.freeze()
    refused = [(stat.S_IFCHR, 1, 1, b"mem"), (stat.S_IFCHR, 1, 2, b"kmem"), (stat.S_IFCHR, 1, 4, b"port"),
               (stat.S_IFCHR, 5, 1, b"console"), (stat.S_IFCHR, 10, 232, b"kvm"), (stat.S_IFCHR, 4, 0, b"tty0"),
               (stat.S_IFBLK, 8, 0, b"sda"), (stat.S_IFBLK, 7, 0, b"loop0"), (stat.S_IFBLK, 0, 0, b"blk0")]
    for kind, major, minor, name in refused:
        assert env.mknod(ROOT, name, kind | 0o666, os.makedev(major, minor))[0] == -errno.EPERM, name
        assert not os.path.lexists(env.share / os.fsdecode(name)), name
    if not IS_ROOT:
        pytest.skip("making the allowed device nodes needs CAP_MKNOD")
    for major, minor, name in [(1, 3, b"null"), (1, 5, b"zero"), (0, 0, b"whiteout")]:
        err, body = env.mknod(ROOT, name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        assert err == 0, name
        node = entry_node(body)
        assert os.stat(env.share / os.fsdecode(name)).st_rdev == os.makedev(major, minor)
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
            assert env.open(node, flags)[0] == -errno.EPERM, name
        assert env.create(ROOT, name, os.O_RDWR)[0] == -errno.EPERM, name
        assert env.getxattr(node, b"user.x")[0] == -errno.EPERM, name
        assert env.setattr(node, F.FATTR_SIZE, size=0)[0] == -errno.EINVAL, name
    # RENAME_WHITEOUT leaves a 0:0 node behind, as overlayfs wants
    (env.share / "w").write_bytes(b"")
    assert env.rename(ROOT, b"w", ROOT, b"w2", RENAME_WHITEOUT)[0] == 0
    assert os.stat(env.share / "w").st_rdev == 0 and stat.S_ISCHR(os.stat(env.share / "w").st_mode)
    env.assert_untouched()


@pytest.mark.skipif(not IS_ROOT, reason="a host-made character device node needs CAP_MKNOD")
def test_host_device_nodes_in_the_share_are_never_opened(env):
    """A device node already in the share (made on the host; here /dev/zero's 1:5 and /dev/null's 1:3)
    is never opened by the server: OPEN, CREATE over it, xattrs, truncate.

    Can fail: opening it would answer OPEN with a handle whose READ returns the host device's bytes."""
    os.mknod(env.share / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    os.mknod(env.share / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    env.freeze()
    for name in (b"zero", b"null"):
        node, mode = env.node(ROOT, name)
        assert stat.S_ISCHR(mode)
        for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDONLY | os.O_NONBLOCK):
            assert env.open(node, flags)[0] == -errno.EPERM, (name, flags)
        assert env.create(ROOT, name, os.O_RDWR)[0] == -errno.EPERM
        assert env.setxattr(node, b"user.x", b"1")[0] == -errno.EPERM
        assert env.setattr(node, F.FATTR_SIZE, size=0)[0] == -errno.EINVAL
    assert env.h.dev.server._handles == {}
    env.assert_untouched()


def test_fifos_never_block_the_server(env):
    """A FIFO the guest makes (MKNOD S_IFIFO is allowed) is never opened by the server, in any mode, nor
    through the requests that re-open an inode (xattrs, truncate, CREATE over it): each answers at once.

    Can fail: open(2) of a FIFO without a peer blocks the device loop (the helper then unblocks it and
    reports it stuck)."""
    env.freeze()
    err, body = env.mknod(ROOT, b"p", stat.S_IFIFO | 0o644)
    assert err == 0
    node = entry_node(body)
    fifo = env.share / "p"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    calls = [
        (F.OPEN, node, F.OPEN_IN.pack(os.O_RDONLY, 0)),
        (F.OPEN, node, F.OPEN_IN.pack(os.O_RDWR | os.O_TRUNC, 0)),
        (F.OPENDIR, node, F.OPEN_IN.pack(os.O_RDONLY, 0)),
        (F.GETXATTR, node, F.GETXATTR_IN.pack(64, 0) + b"user.x\0"),
        (F.SETXATTR, node, F.SETXATTR_IN.pack(1, 0) + b"user.x\0" + b"1"),
        (F.LISTXATTR, node, F.GETXATTR_IN.pack(64, 0)),
        (F.SETATTR, node, F.SETATTR_IN.pack(F.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
        (F.CREATE, ROOT, F.CREATE_IN.pack(os.O_RDONLY, 0o644, 0, 0) + b"p\0"),
    ]
    for call in calls:
        err, stuck = _call_unblocking_fifo(env.h, fifo, *call)
        assert not stuck, f"opcode {call[0]} blocked on a FIFO"
        assert err in (-errno.EPERM, -errno.EINVAL, -errno.ENOTDIR), (call[0], err)
    env.assert_untouched()


# -- the kernel's half: openat2 ------------------------------------------------------------------------------

def test_open_beneath_refuses_what_check_name_refuses(tmp_path):
    """The second line behind ``check_name``: openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
    RESOLVE_NO_MAGICLINKS) itself refuses '..' above the directory, absolute names, symlinks anywhere in
    the walk and /proc magic links; a trailing symlink with O_PATH comes back as the link.

    Can fail: plain openat() accepts every one of these names."""
    (tmp_path / "share" / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(SECRET)
    os.symlink(tmp_path / "secret", tmp_path / "share" / "abs")
    os.symlink("../secret", tmp_path / "share" / "rel")
    os.symlink(tmp_path, tmp_path / "share" / "dirlink")
    held = os.open(tmp_path / "secret", os.O_RDONLY | os.O_CLOEXEC)
    os.symlink(f"/proc/self/fd/{held}", tmp_path / "share" / "magic")
    dirfd = os.open(tmp_path / "share", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in ("..", "../secret", "sub/../../secret", str(tmp_path / "secret"), "/etc/passwd"):
            with pytest.raises(OSError) as e:
                os.close(resolve.open_beneath(dirfd, name, os.O_RDONLY))
            assert e.value.errno == errno.EXDEV, name
        for name in ("abs", "rel", "magic", "dirlink/secret"):
            with pytest.raises(OSError) as e:
                os.close(resolve.open_beneath(dirfd, name, os.O_RDONLY))
            assert e.value.errno == errno.ELOOP, name
        fd = resolve.open_beneath(dirfd, "magic", os.O_PATH)
        try:
            assert stat.S_ISLNK(os.fstat(fd).st_mode)
            with pytest.raises(OSError) as e:
                os.close(resolve.reopen(fd, os.O_RDONLY))
            assert e.value.errno == errno.ELOOP
        finally:
            os.close(fd)
        fd = resolve.open_beneath(dirfd, "sub/..", os.O_PATH)  # '..' that stays beneath is fine
        assert os.fstat(fd).st_ino == os.fstat(dirfd).st_ino
        os.close(fd)
    finally:
        os.close(dirfd)
        os.close(held)


def test_a_well_behaved_session_still_works(env):
    """The confinement keeps ordinary use working: create, write, read back, truncate, chmod, utimes,
    xattrs, statfs and syncfs (of the share's file system only)."""
    env.freeze()
    err, body = env.create(ROOT, b"f", os.O_RDWR, 0o600)
    assert err == 0
    node, fh = entry_node(body), create_fh(body)
    assert env.write(node, fh, b"hello world")[0] == 0
    assert env.read(node, fh) == (0, b"hello world")
    assert env.setattr(node, F.FATTR_SIZE, size=5)[0] == 0 and (env.share / "f").read_bytes() == b"hello"
    assert env.setattr(node, F.FATTR_MODE, mode=0o640)[0] == 0
    assert stat.S_IMODE(os.stat(env.share / "f").st_mode) == 0o640
    assert env.setattr(node, F.FATTR_MTIME, mtime=1234)[0] == 0 and os.stat(env.share / "f").st_mtime == 1234
    assert env.setxattr(node, b"user.k", b"v")[0] == 0 and env.getxattr(node, b"user.k") == (0, b"v")
    assert env.call(F.STATFS, ROOT, b"")[0] == 0
    assert env.call(F.SYNCFS, ROOT, bytes(8))[0] == 0
    assert env.release(node, fh)[0] == 0
    env.assert_untouched()


NO_OPENAT2_CHILD = """
import ctypes, errno, sys, tempfile
libc = ctypes.CDLL(None, use_errno=True)

class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

# seccomp(2): openat2 (437) fails with errno {err}, as on a kernel before 5.6 or under a container's profile
insns = (Filter * 4)(Filter(0x20, 0, 0, 0), Filter(0x15, 0, 1, 437), Filter(0x06, 0, 0, 0x00050000 | {err}),
                     Filter(0x06, 0, 0, 0x7FFF0000))
prog = Prog(4, insns)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, MODE_FILTER
from katapy.vmm.virtio.fs import FsDevice
from katapy.vmm.virtio.fs.resolve import Openat2Unavailable
try:
    FsDevice("t", tempfile.mkdtemp())
except Openat2Unavailable as e:
    print("refused:", e)
else:
    print("constructed")
"""


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EPERM])
def test_no_openat2_is_a_clear_error_at_construction(err):
    """Without openat2(2) (a kernel before 5.6: ENOSYS; a seccomp profile refusing it: EPERM) the device
    is not built at all, with an error that says why, rather than serving the share unconfined.  The
    child process's own seccomp filter makes the kernel answer openat2 that way.

    Can fail: a server that fell back to plain openat, or probed nothing, would print "constructed"."""
    import subprocess

    from katapy import paths

    env = dict(os.environ, PYTHONPATH=f"{paths.REPO_ROOT}:{paths.REPO_ROOT / 'src'}")
    r = subprocess.run([sys.executable, "-c", NO_OPENAT2_CHILD.format(err=err)], capture_output=True, text=True,
                       timeout=60, cwd=paths.REPO_ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused:" in r.stdout and "openat2(2)" in r.stdout and "confine" in r.stdout, r.stdout
