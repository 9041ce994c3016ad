"""A deterministic writer for the cpio "newc" format the kernel unpacks as an initramfs.

Format: Documentation/driver-api/early-userspace/buffer-format.rst — a 110-byte
ASCII header (magic ``070701`` and 13 eight-digit hex fields), the NUL-ended
name padded to 4 bytes, the data padded to 4 bytes, and a ``TRAILER!!!`` entry.
All mtimes are 0 and inode numbers are assigned in order, so the same tree
always gives the same bytes (and so the same cache key downstream).
"""
from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable


class CpioWriter:
    def __init__(self, out: BinaryIO):
        self._out = out
        self._ino = 1
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        name = name.lstrip("/") or "."
        if name in self._seen:
            return
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(hdr + encoded + b"\0" * (-(len(hdr) + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def tree(self, root: Path, prefix: str = "") -> None:
        """Add everything under ``root`` (files, dirs, symlinks) at ``prefix``, sorted."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            base = prefix.rstrip("/") + ("" if rel == "." else "/" + rel)
            if base:
                self.directory(base, stat.S_IMODE(os.lstat(dirpath).st_mode))
            for d in list(dirnames):
                p = os.path.join(dirpath, d)
                if os.path.islink(p):  # os.walk lists links to dirs as dirs
                    self.symlink(f"{base}/{d}", os.readlink(p))
                    dirnames.remove(d)
            for f in sorted(filenames):
                p = os.path.join(dirpath, f)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(f"{base}/{f}", os.readlink(p))
                elif stat.S_ISREG(st.st_mode):
                    self.file(f"{base}/{f}", Path(p).read_bytes(), stat.S_IMODE(st.st_mode))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0)


def write_archive(path: Path, build: Callable[[CpioWriter], None], compress: bool = False) -> None:
    """Write a newc archive to ``path`` atomically; gzip-compressed when ``compress``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw:
        if compress:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                w = CpioWriter(gz)  # type: ignore[arg-type]
                build(w)
                w.finish()
        else:
            w = CpioWriter(raw)
            build(w)
            w.finish()
    tmp.replace(path)


def write_gz(path: Path, build: Callable[[CpioWriter], None]) -> None:
    write_archive(path, build, compress=True)
