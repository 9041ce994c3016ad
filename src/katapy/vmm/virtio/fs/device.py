"""The virtio-fs device (virtio 1.2, section 5.11): FUSE requests served in-process from a host directory.

Config: ``u8 tag[36]; le32 num_request_queues``.  Queue 0 is the hiprio
queue (FORGET, INTERRUPT), queues 1.. carry requests.  Each chain is one
request: fuse_in_header + body readable, fuse_out_header + reply writable.
Requests run to completion on the device's event loop thread.
"""
from __future__ import annotations

import errno
import os
import struct

from katapy import log
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory, GuestMemoryError
from katapy.vmm.virtio.device import (
    VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_FS, DeviceError, Interrupt,
    QueueState, VirtioDevice,
)
from katapy.vmm.virtio.fs import fuse as F
from katapy.vmm.virtio.fs.fdlimit import raise_nofile_limit
from katapy.vmm.virtio.fs.passthrough import FuseServer, NoReply, Request
from katapy.vmm.virtio.fs.resolve import check_host
from katapy.vmm.virtio.queue import DescriptorChain, Queue

_log = log.get("vmm.virtio.fs")

QUEUE_SIZE = 1024
TAG_SIZE = 36


class FsDevice(VirtioDevice):
    device_type = VIRTIO_ID_FS
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)  # hiprio + one request queue

    def __init__(self, tag: str, shared_dir: str | os.PathLike[str]):
        super().__init__()
        raw = tag.encode()
        if not raw or len(raw) > TAG_SIZE:
            raise ValueError(f"virtio-fs tag must be 1..{TAG_SIZE} bytes")
        self.tag = tag
        self.shared_dir = os.fspath(shared_dir)
        if not os.path.isdir(self.shared_dir):
            raise FileNotFoundError(f"shared directory {self.shared_dir} does not exist")
        fd = os.open(self.shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            check_host(fd)  # openat2(2) and procfs, or no confinement: fail before the guest boots (resolve.py)
        finally:
            os.close(fd)
        self.server: FuseServer | None = None
        self._queues: list[Queue] = []
        self._kick_fds: list[int] = []
        self._interrupt: Interrupt | None = None
        self._loop: EventLoop | None = None

    def avail_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX

    def config_space(self) -> bytes:
        return self.tag.encode().ljust(TAG_SIZE, b"\0") + struct.pack("<I", len(self.queue_max_sizes) - 1)

    def activate(self, mem: GuestMemory, queues: list[QueueState], kick_fds: list[int], interrupt: Interrupt,
                 loop: EventLoop) -> None:
        if len(queues) < 2:
            raise DeviceError("virtio-fs needs the hiprio queue and a request queue")
        for q in queues:
            q.event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
        self._queues = [Queue(mem, q) for q in queues]
        self._kick_fds, self._interrupt, self._loop = list(kick_fds), interrupt, loop
        raise_nofile_limit()  # one fd per inode the guest holds (fdlimit.py)
        self.server = FuseServer(self.shared_dir)  # a fresh FUSE session per driver activation
        self.broken = False
        for i, fd in enumerate(self._kick_fds):
            loop.add(fd, lambda fd, ev, i=i: self._on_kick(i, fd))
        _log.info("virtio-fs activated", tag=self.tag, shared_dir=self.shared_dir)
        for i in range(len(self._queues)):
            self._process(i)

    def reset(self) -> None:
        if self._loop is not None:
            for fd in self._kick_fds:
                self._loop.remove(fd)
        if self.server is not None:
            self.server.close()
            self.server = None
        self._queues, self._kick_fds, self._interrupt, self._loop = [], [], None, None

    def _on_kick(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        if not self.broken:
            self._process(index)

    def _process(self, index: int) -> None:
        q = self._queues[index]
        try:
            while (chain := q.pop_valid(_log)) is not None:
                q.add_used(chain.head, self._serve(chain))
        except (DeviceError, GuestMemoryError) as e:
            _log.error("virtio-fs queue broken by the driver", queue=index, error=str(e))
            self.broken = True
            for fd in self._kick_fds:
                self._loop.remove(fd)
            self._interrupt.signal_needs_reset(str(e))
            return
        if q.needs_notification():
            self._interrupt.signal_used_queue(index)

    def _serve(self, chain: DescriptorChain) -> int:
        """Run one FUSE request; returns the bytes written into the chain."""
        r = chain.reader()
        raw = r.read(F.IN_HEADER.size)
        if len(raw) < F.IN_HEADER.size:
            _log.warning("virtio-fs: request shorter than fuse_in_header", length=len(raw))
            return 0
        length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = F.IN_HEADER.unpack(raw)
        w = chain.writer()
        if w.available() < F.OUT_HEADER.size:
            if opcode not in (F.FORGET, F.BATCH_FORGET, F.INTERRUPT):
                _log.warning("virtio-fs: no room for a reply", opcode=opcode)
            reply_room = False
        else:
            reply_room = True
        # in.len is the whole request, header and arguments (5.11.6.1: the chain's readable part is
        # one FUSE request); the arguments end there, never past what the chain carries.
        if not F.IN_HEADER.size <= length <= chain.readable_len:
            _log.warning("virtio-fs: fuse_in_header.len does not fit the chain", opcode=opcode, length=length,
                         readable=chain.readable_len)
            return self._reply(chain, unique, -errno.EINVAL) if reply_room else 0
        r = chain.reader(length)
        r.skip(F.IN_HEADER.size)
        req = Request(opcode, unique, nodeid, uid, gid, pid, r)
        body: bytes | int
        error = 0
        w.skip(F.OUT_HEADER.size)
        try:
            body = self.server.handle(req, w)
        except NoReply:
            return 0
        except OSError as e:
            error, body = -(e.errno or errno.EIO), b""
            if e.errno not in (errno.ENOENT, errno.ENOSYS, errno.ENODATA, errno.EEXIST, errno.ENOTEMPTY):
                _log.debug("fuse request failed", opcode=opcode, error=str(e))
        except GuestMemoryError:
            raise
        except OverflowError:  # a u64 offset or size from the guest that the host's off_t cannot hold
            error, body = -errno.EINVAL, b""
        except Exception as e:  # a bug in a handler fails the request, not the device
            _log.error("fuse handler crashed", opcode=opcode, error=repr(e), exc_info=True)
            error, body = -errno.EIO, b""
        if not reply_room:
            return 0
        if isinstance(body, int):
            n = body
        else:
            n = w.write(body)
            if n < len(body):
                error, n = -errno.ERANGE, 0
        return self._reply(chain, unique, error, n)

    @staticmethod
    def _reply(chain: DescriptorChain, unique: int, error: int, body_len: int = 0) -> int:
        """Write fuse_out_header before a ``body_len``-byte reply already in place; the used length."""
        chain.writer().write(F.OUT_HEADER.pack(F.OUT_HEADER.size + body_len, error, unique))
        return F.OUT_HEADER.size + body_len
