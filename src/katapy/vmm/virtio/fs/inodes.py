"""The FUSE inode table: node ids -> O_PATH file descriptors inside the shared directory.

Every inode is held as an ``O_PATH | O_NOFOLLOW`` fd opened *relative to its
parent's fd* with a single validated name component, by openat2(2) with
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` (resolve.py),
so no request can name a path outside the share: there are no path strings,
``..`` is refused (by ``check_name`` and again by the kernel), and symlinks are
never followed by the server (their targets are only data).
Lookups of the same host inode (hard links) share one node id; ``nlookup``
counts the kernel's references (FORGET drops them).
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass

from katapy.vmm.virtio.fs.fuse import ROOT_ID
from katapy.vmm.virtio.fs.resolve import check_host, open_beneath


@dataclass
class Inode:
    nodeid: int
    fd: int
    dev: int
    ino: int
    mode: int
    nlookup: int = 0


def check_name(name: bytes) -> str:
    """One path component from the guest; anything that could walk elsewhere is EINVAL/ENAMETOOLONG."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, f"invalid name {name[:64]!r}")
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    return os.fsdecode(name)


class InodeTable:
    def __init__(self, root: str):
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            check_host(fd)
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._lock = threading.Lock()
        self.root = Inode(ROOT_ID, fd, st.st_dev, st.st_ino, st.st_mode, 2)
        self._by_id: dict[int, Inode] = {ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {(st.st_dev, st.st_ino): self.root}
        self._next = ROOT_ID + 1

    def get(self, nodeid: int) -> Inode:
        node = self._by_id.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, f"unknown node id {nodeid}")
        return node

    def lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Open ``name`` under ``parent`` and take one lookup reference on its node."""
        if not stat.S_ISDIR(parent.mode):
            raise OSError(errno.ENOTDIR, "parent is not a directory")
        fd = open_beneath(parent.fd, check_name(name), os.O_PATH)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        with self._lock:
            node = self._by_key.get((st.st_dev, st.st_ino))
            if node is not None:
                os.close(fd)
            else:
                node = Inode(self._next, fd, st.st_dev, st.st_ino, st.st_mode)
                self._next += 1
                self._by_id[node.nodeid] = node
                self._by_key[(st.st_dev, st.st_ino)] = node
            node.nlookup += 1
            node.mode = st.st_mode
        return node, st

    def forget(self, nodeid: int, n: int) -> None:
        with self._lock:
            node = self._by_id.get(nodeid)
            if node is None or node is self.root:
                return
            node.nlookup -= min(n, node.nlookup)
            if node.nlookup == 0:
                del self._by_id[nodeid]
                self._by_key.pop((node.dev, node.ino), None)
                os.close(node.fd)

    def close(self) -> None:
        with self._lock:
            for node in self._by_id.values():
                os.close(node.fd)
            self._by_id.clear()
            self._by_key.clear()

    def __len__(self) -> int:
        return len(self._by_id)
