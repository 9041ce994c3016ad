"""The kernel's attribute files (sysfs, procfs) under a root directory: ``/`` in the guest, a tmp tree in tests.

A sysfs attribute takes one ``write(2)`` per store (Documentation/filesystems/sysfs.rst,
"Reading/Writing Attribute Data"); the store's error comes back as that
write's errno, which the upcall handlers pass on to the VMM as ``-errno``.
Tests subclass :class:`Sysfs` and override :meth:`Sysfs.write` to act the way
the kernel does on a store (create a memory block on ``probe``, refuse an
``offline``...).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


def errno_of(exc: OSError) -> int:
    """The positive errno an OSError carries (EIO when it carries none)."""
    return exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO


class Sysfs:
    """Reads and single-write stores of kernel attribute files below ``root``."""

    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        """``rel`` (``"sys/devices/system/memory"``) below the root."""
        return self.root / rel

    def read(self, path: Path) -> str:
        """The attribute's text; OSError as read(2) fails."""
        with open(path) as f:
            return f.read()

    def write(self, path: Path, text: str) -> None:
        """Store ``text`` with one write(2), as ``echo text > path`` does; OSError with the kernel's errno."""
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            data = text.encode()
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, f"short write to {path}")
        finally:
            os.close(fd)

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)
