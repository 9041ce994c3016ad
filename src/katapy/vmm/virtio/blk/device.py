"""The virtio-blk device (virtio 1.2, section 5.2) over a raw disk image.

One request queue.  Features offered: VERSION_1, INDIRECT_DESC, EVENT_IDX,
SEG_MAX, BLK_SIZE, FLUSH (so the guest treats the cache as write-back and
sends flushes), RO for a read-only disk, and for a writable one DISCARD
(when the file system can punch holes) and WRITE_ZEROES.

Requests run to completion on the device's event-loop thread (5.2.6), at
most BATCH per turn of the loop (the rest is re-scheduled through it, so a
driver keeping the queue full cannot starve the other fds on that loop):
IN/OUT move data between the image and guest RAM with preadv/pwritev over
views of guest memory; FLUSH is fdatasync; GET_ID returns the serial;
DISCARD/WRITE_ZEROES go to fallocate.  Every guest-supplied sector, length
and segment is checked against the capacity and the advertised limits
(seg_max data segments per request, or the queue size when the driver did
not accept VIRTIO_BLK_F_SEG_MAX);
a bad request is answered IOERR (UNSUPP for an unknown type or flag), never
raised.  A chain without a status byte is completed with length 0.
"""
from __future__ import annotations

import hashlib
import os
import struct

from katapy import log
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory, GuestMemoryError
from katapy.vmm.virtio.blk.image import DiskImage
from katapy.vmm.virtio.blk.request import (
    ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE, SEGMENT, SEGMENT_FLAG_UNMAP, NoStatusByte, Request, RequestType, Status,
    parse,
)
from katapy.vmm.virtio.device import (
    VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, DeviceError, Interrupt,
    QueueState, VirtioDevice,
)
from katapy.vmm.virtio.queue import DescriptorChain, Queue

_log = log.get("vmm.virtio.blk")

# Feature bits, 5.2.3.
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

QUEUE_SIZE = 1024  # QEMU's virtio-mmio offers QueueNumMax 1024 whatever queue-size says; Linux takes it
SEG_MAX = 128  # data segments in one request (the chain holds two more: header and status)
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_ALIGNMENT_SECTORS = 8  # 4 KiB, the host page size
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32
#: requests served per turn of the device loop before the rest is re-scheduled (as virtio-net's BATCH)
BATCH = 64

#: struct virtio_blk_config (5.2.4) up to write_zeroes_may_unmap and its padding: 60 bytes.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
#: The whole 1.2 layout (secure-erase and zoned fields follow, zero: those features are not offered).
#: A front end such as QEMU reads as many bytes as the features it knows imply.
CONFIG_SIZE = 96


class BlockDevice(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False, serial: str | None = None):
        super().__init__()
        self.image = DiskImage(path, read_only)
        self.read_only = read_only
        if serial is None:
            digest = hashlib.sha256(f"{self.image.device_id}".encode()).hexdigest()
            serial = "katapy-" + digest[: ID_BYTES - 7]
        raw = serial.encode()
        if len(raw) > ID_BYTES:
            self.image.close()
            raise ValueError(f"virtio-blk serial must be at most {ID_BYTES} bytes")
        self.serial = raw
        self._queue: Queue | None = None
        self._kick_fd = -1
        self._interrupt: Interrupt | None = None
        self._loop: EventLoop | None = None
        self._more_scheduled = False  # a continuation of a full batch is waiting on the loop
        self._seg_limit = SEG_MAX  # data segments allowed in one request (see activate)
        self._seg_limit_logged = False
        self.stats = {"read_bytes": 0, "write_bytes": 0, "requests": 0, "errors": 0}

    # -- features and config ------------------------------------------------------
    def avail_features(self) -> int:
        f = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX
             | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH)
        if self.read_only:
            f |= 1 << VIRTIO_BLK_F_RO
        else:
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
            if self.image.can_discard:
                f |= 1 << VIRTIO_BLK_F_DISCARD
        return f

    def config_space(self) -> bytes:
        return CONFIG.pack(
            self.image.sectors,  # capacity, in 512-byte sectors
            0,  # size_max (not offered)
            SEG_MAX,
            0, 0, 0,  # geometry (not offered)
            SECTOR_SIZE,  # blk_size
            0, 0, 0, 0,  # topology (not offered)
            0,  # writeback (CONFIG_WCE not offered)
            0,  # unused0
            1,  # num_queues (MQ not offered)
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT_SECTORS,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
            1 if self.image.can_discard else 0,  # write_zeroes_may_unmap
        ).ljust(CONFIG_SIZE, b"\0")

    # -- life cycle ------------------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: list[QueueState], kick_fds: list[int], interrupt: Interrupt,
                 loop: EventLoop) -> None:
        if not queues:
            raise DeviceError("virtio-blk needs its request queue")
        queues[0].event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
        self._queue = Queue(mem, queues[0])
        self._kick_fd, self._interrupt, self._loop = kick_fds[0], interrupt, loop
        self.broken = False
        self._more_scheduled = False
        # seg_max (5.2.4) binds a driver that accepted VIRTIO_BLK_F_SEG_MAX; one that did not is
        # still bound by the queue: no chain longer than the queue size (2.7.5.3.1).
        self._seg_limit = SEG_MAX if self.has_feature(VIRTIO_BLK_F_SEG_MAX) else queues[0].size
        loop.add(self._kick_fd, self._on_kick)
        _log.info("virtio-blk activated", path=str(self.image.path), read_only=self.read_only,
                  sectors=self.image.sectors, features=hex(self.acked_features))
        self._process()

    def reset(self) -> None:
        if self._loop is not None and self._kick_fd >= 0:
            self._loop.remove(self._kick_fd)
        self._queue, self._kick_fd, self._interrupt, self._loop = None, -1, None, None
        self._more_scheduled = False

    def close(self) -> None:
        self.reset()
        self.image.close()

    # -- queue processing ---------------------------------------------------------------
    def _on_kick(self, fd: int, events: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        # With a continuation pending, it serves what this kick announced (it reads avail.idx afresh).
        if not self.broken and self._queue is not None and not self._more_scheduled:
            self._process()

    def _resume(self, queue: Queue) -> None:
        """The continuation of a full batch; a no-op once the queue it was for is gone (reset)."""
        if queue is self._queue:
            self._more_scheduled = False
            self._process()

    def _process(self) -> None:
        """Serve at most BATCH available requests (5.2.6), each added to the used ring as it
        completes (2.7.8), then notify the driver if it asked (2.7.7, used buffer notification suppression).

        A full batch re-schedules the rest with ``call_soon`` instead of looping: the loop first
        serves the other fds that are ready (the same VM's vsock, net), so a driver that keeps the
        queue full cannot hold the loop.  Chains are popped once, on this thread, so none is lost
        or served twice; the continuation picks up whatever the driver added meanwhile.
        """
        q, loop = self._queue, self._loop
        if self.broken or q is None or self._interrupt is None or loop is None:
            return
        try:
            for _ in range(BATCH):
                chain = q.pop_valid(_log)
                if chain is None:
                    break
                q.add_used(chain.head, self._serve(chain))
            else:
                self._more_scheduled = True
                loop.call_soon(lambda: self._resume(q))
        except (DeviceError, GuestMemoryError) as e:
            _log.error("virtio-blk queue broken by the driver", error=str(e))
            self.broken = True
            if self._loop is not None and self._kick_fd >= 0:
                self._loop.remove(self._kick_fd)
            self._interrupt.signal_needs_reset(str(e))
            return
        if q.needs_notification():
            self._interrupt.signal_used_queue(0)

    def _serve(self, chain: DescriptorChain) -> int:
        """Execute one request; returns the used length (payload written + the status byte)."""
        try:
            req = parse(chain)
        except NoStatusByte as e:
            _log.warning("virtio-blk request without a status byte completed empty", error=str(e))
            return 0
        self.stats["requests"] += 1
        status, written = Status.IOERR, 0
        if req.error is not None:
            _log.warning("virtio-blk bad request", error=req.error)
        elif len(req.data) > self._seg_limit:
            self._too_many_segments(len(req.data))
        else:
            try:
                status, written = self._execute(chain.mem, req)
            except OSError as e:
                _log.warning("virtio-blk I/O error", type=req.type, sector=req.sector, error=str(e))
                status, written = Status.IOERR, 0
        if status is not Status.OK:
            self.stats["errors"] += 1
        chain.mem.write_u8(req.status_addr, int(status))
        return written + 1

    def _too_many_segments(self, segments: int) -> None:
        """A request with more data segments than seg_max (5.2.4), which the driver must not send:
        it fails with IOERR.  Warned about once per device: a guest could send one per chain."""
        if not self._seg_limit_logged:
            self._seg_limit_logged = True
            _log.warning("virtio-blk request has more data segments than seg_max; failed with IOERR "
                         "(further ones are not logged)", segments=segments, limit=self._seg_limit)

    def _execute(self, mem: GuestMemory, req: Request) -> tuple[Status, int]:
        t = req.type
        if t in (RequestType.IN, RequestType.OUT):
            return self._rw(mem, req)
        if t == RequestType.FLUSH:
            if req.data_len:
                return Status.IOERR, 0
            if not self.read_only:
                self.image.flush()
            return Status.OK, 0
        if t == RequestType.GET_ID:
            n = min(ID_BYTES, req.data_len)
            ident = self.serial.ljust(ID_BYTES, b"\0")[:n]
            off = 0
            for addr, length in req.data:
                take = min(length, n - off)
                if take <= 0:
                    break
                mem.write(addr, ident[off : off + take])
                off += take
            return Status.OK, n
        if t in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
            return self._discard_or_zero(mem, req), 0
        return Status.UNSUPP, 0

    def _check_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR_SIZE == 0 and sector + (nbytes >> SECTOR_SHIFT) <= self.image.sectors

    def _rw(self, mem: GuestMemory, req: Request) -> tuple[Status, int]:
        n = req.data_len
        if not self._check_range(req.sector, n):
            _log.warning("virtio-blk request outside the disk or not whole sectors", type=req.type,
                         sector=req.sector, length=n, capacity=self.image.sectors)
            return Status.IOERR, 0
        if req.type == RequestType.OUT and self.read_only:
            return Status.IOERR, 0
        views = [mem.slice(a, length) for a, length in req.data]
        offset = req.sector << SECTOR_SHIFT
        try:
            if req.type == RequestType.IN:
                done = self.image.read_into(offset, views)
                self.stats["read_bytes"] += done
                return Status.OK, done
            done = self.image.write_from(offset, views)
            self.stats["write_bytes"] += done
            return Status.OK, 0
        finally:
            for v in views:
                v.release()

    def _discard_or_zero(self, mem: GuestMemory, req: Request) -> Status:
        discard = req.type == RequestType.DISCARD
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if self.read_only or not self.has_feature(feature):
            return Status.UNSUPP
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        # The payload is whole segments, at most max_*_seg of them (5.2.6.2).  Checked before it is
        # read: the guest's descriptors may name all of its RAM many times over.
        n = req.data_len
        if not n or n % SEGMENT.size or n // SEGMENT.size > max_seg:
            return Status.IOERR
        raw = b"".join(mem.read(a, length) for a, length in req.data)
        segments = [SEGMENT.unpack_from(raw, off) for off in range(0, len(raw), SEGMENT.size)]
        for sector, count, flags in segments:
            if flags & ~SEGMENT_FLAG_UNMAP or (discard and flags & SEGMENT_FLAG_UNMAP):
                return Status.UNSUPP
            if count > max_sectors or sector + count > self.image.sectors:
                return Status.IOERR
        for sector, count, flags in segments:
            offset, length = sector << SECTOR_SHIFT, count << SECTOR_SHIFT
            if discard:
                self.image.discard(offset, length)
            else:
                self.image.write_zeroes(offset, length, bool(flags & SEGMENT_FLAG_UNMAP))
        return Status.OK
