"""The host side of a virtio-blk disk: a raw image file (or a block device) opened once.

I/O goes straight between the file and guest RAM: ``preadv``/``pwritev``
(preadv(2)) over zero-copy views of guest memory, at most IOV_MAX vectors a
call, looping on short transfers.  DISCARD and WRITE_ZEROES use
fallocate(2) (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE)
when the file system supports them; :meth:`DiskImage.probe_discard` finds out
at open time so the device offers only what works.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

from katapy.vmm.virtio.blk.request import SECTOR_SIZE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
IOV_MAX = 1024
ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


class DiskImageError(OSError):
    pass


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class DiskImage:
    """A raw disk image: size in whole sectors, positional vectored I/O, flush, hole punching."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise DiskImageError(e.errno, f"cannot open disk image {self.path}: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISBLK(st.st_mode):
                size = os.lseek(self.fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                raise DiskImageError(errno.EINVAL, f"{self.path} is neither a regular file nor a block device")
            if size % SECTOR_SIZE:
                raise DiskImageError(errno.EINVAL, f"{self.path}: size {size} is not a multiple of {SECTOR_SIZE}")
            self.size = size
            self.device_id = (st.st_dev, st.st_ino)
            self.can_discard = False if read_only else self.probe_discard()
            self.can_zero_range = False if read_only else self._probe(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def _probe(self, mode: int) -> bool:
        # One sector past the end with KEEP_SIZE: changes nothing, fails with EOPNOTSUPP where unsupported.
        try:
            fallocate(self.fd, mode, self.size, SECTOR_SIZE)
            return True
        except OSError:
            return False

    def probe_discard(self) -> bool:
        return self._probe(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)

    # -- I/O --------------------------------------------------------------------
    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill ``buffers`` from ``offset``; reads past EOF never happen (the device checks bounds)."""
        return self._vectored(os.preadv, offset, buffers)

    def write_from(self, offset: int, buffers: list[memoryview]) -> int:
        return self._vectored(os.pwritev, offset, buffers)

    def _vectored(self, op, offset: int, buffers: list[memoryview]) -> int:  # op: os.preadv | os.pwritev
        pending = [b for b in buffers if len(b)]
        done = 0
        while pending:
            batch = pending[:IOV_MAX]
            n = op(self.fd, batch, offset + done)
            if n == 0:
                raise DiskImageError(errno.EIO, f"{self.path}: short transfer at offset {offset + done}")
            done += n
            # drop what was transferred; keep the rest of a partly done buffer
            while n and pending:
                if n >= len(pending[0]):
                    n -= len(pending.pop(0))
                else:
                    pending[0] = pending[0][n:]
                    n = 0
        return done

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero a range: punch a hole if allowed, else ZERO_RANGE, else plain writes of zeros."""
        if unmap and self.can_discard:
            self.discard(offset, length)
            return
        if self.can_zero_range:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        zeros = bytes(min(length, ZERO_CHUNK))
        done = 0
        while done < length:
            n = min(len(zeros), length - done)
            self.write_from(offset + done, [memoryview(zeros)[:n]])
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
