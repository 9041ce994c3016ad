"""virtio-blk without a guest: requests built as a Linux driver builds them, through real rings."""
from __future__ import annotations

import hashlib
import os
import struct
import time

import pytest
import structlog
from hypothesis import HealthCheck, given, settings, strategies as st

from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory
from katapy.vmm.virtio.blk import BlockDevice, DiskImageError
from katapy.vmm.virtio.blk.device import (
    BATCH, CONFIG, QUEUE_SIZE, SEG_MAX, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
)
from katapy.vmm.virtio.blk.request import HEADER, SEGMENT, RequestType, Status
from katapy.vmm.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, EventFdInterrupt

from .driver import DriverQueue

DISK_SECTORS = 2048  # 1 MiB


class BlkHarness:
    def __init__(self, path, read_only=False, features=None):
        self.mem = GuestMemory.create([(0, 8 << 20)])
        self.dev = BlockDevice(path, read_only)
        self.dev.ack_features(self.dev.avail_features() if features is None else features)
        self.q = DriverQueue(self.mem, 0x1000, 0x100000, 0x600000, size=64)
        self.loop = EventLoop()
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.dev.activate(self.mem, [self.q.state(256)], [self.kick], EventFdInterrupt({0: self.call_fd}), self.loop)

    def request(self, rtype, sector=0, out=b"", in_len=0, status_len=1, indirect=False, split=0):
        parts = [(HEADER.pack(rtype, 0, sector), False)]
        if out:
            if split:
                parts += [(out[i : i + split], False) for i in range(0, len(out), split)]
            else:
                parts.append((out, False))
        if in_len:
            parts.append((in_len, True))
        if status_len:
            parts.append((status_len, True))
        head = self.q.add_chain(parts, indirect=indirect)
        bufs = list(self.q.bufs[head])
        self.dev._process()
        (used_head, length, _), = self.q.take_used()
        assert used_head == head
        # everything the device could have written, status byte last (the used length may be shorter)
        return length, b"".join(self.mem.read(b.addr, b.len) for b in bufs if b.write)

    def read(self, sector, nbytes, **kw):
        length, data = self.request(RequestType.IN, sector, in_len=nbytes, **kw)
        return data[nbytes], data[:nbytes], length

    def write(self, sector, payload, **kw):
        length, data = self.request(RequestType.OUT, sector, out=payload, **kw)
        return data[0]

    def close(self):
        self.dev.close()
        self.loop.close()
        os.close(self.kick)
        os.close(self.call_fd)
        self.mem.close()


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(DISK_SECTORS * 512))
    return p


@pytest.fixture
def h(disk):
    hs = BlkHarness(disk)
    yield hs
    hs.close()


def test_config_space_and_features(disk):
    dev = BlockDevice(disk, read_only=False)
    cfg = CONFIG.unpack(dev.config_space()[: CONFIG.size])
    assert cfg[0] == DISK_SECTORS and cfg[6] == 512 and len(dev.config_space()) == 96
    f = dev.avail_features()
    assert f >> VIRTIO_F_VERSION_1 & 1 and f >> VIRTIO_BLK_F_FLUSH & 1 and f >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    assert not f >> VIRTIO_BLK_F_RO & 1
    dev.close()
    ro = BlockDevice(disk, read_only=True)
    f = ro.avail_features()
    assert f >> VIRTIO_BLK_F_RO & 1 and not f >> VIRTIO_BLK_F_DISCARD & 1 and not f >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    ro.close()


def test_read_returns_image_bytes(h, disk):
    img = disk.read_bytes()
    status, data, length = h.read(3, 4096)
    assert status == Status.OK and data == img[3 * 512 : 3 * 512 + 4096] and length == 4097


def test_write_then_read_back_and_on_disk(h, disk):
    payload = os.urandom(8192)
    assert h.write(10, payload, split=1536) == Status.OK  # data over descriptors of odd sizes
    assert disk.read_bytes()[10 * 512 : 10 * 512 + 8192] == payload
    status, data, _ = h.read(10, 8192, indirect=True)
    assert status == Status.OK and data == payload


def test_out_of_range_and_partial_sectors_fail(h, disk):
    before = hashlib.sha256(disk.read_bytes()).digest()
    assert h.read(DISK_SECTORS - 1, 1024)[0] == Status.IOERR
    assert h.read(2**64 - 1, 512)[0] == Status.IOERR
    assert h.write(DISK_SECTORS, b"x" * 512) == Status.IOERR
    assert h.write(0, b"x" * 100) == Status.IOERR
    assert h.read(0, 100)[0] == Status.IOERR
    assert hashlib.sha256(disk.read_bytes()).digest() == before
    assert h.read(DISK_SECTORS - 1, 512)[0] == Status.OK  # the last sector is fine


def test_read_only_refuses_writes(disk):
    before = disk.read_bytes()
    hs = BlkHarness(disk, read_only=True)
    try:
        assert hs.write(0, b"\0" * 512) == Status.IOERR
        assert hs.request(RequestType.DISCARD, out=SEGMENT.pack(0, 8, 0))[1][0] == Status.UNSUPP
        assert hs.request(RequestType.WRITE_ZEROES, out=SEGMENT.pack(0, 8, 0))[1][0] == Status.UNSUPP
        assert hs.request(RequestType.FLUSH)[1][0] == Status.OK
        assert hs.read(0, 512)[1] == before[:512]
    finally:
        hs.close()
    assert disk.read_bytes() == before


def test_flush_get_id_and_unknown(h):
    assert h.request(RequestType.FLUSH) == (1, bytes([Status.OK]))
    length, data = h.request(RequestType.GET_ID, in_len=20)
    assert data[20] == Status.OK and data[:7] == b"katapy-" and length == 21
    assert h.request(77)[1][0] == Status.UNSUPP
    assert h.request(RequestType.GET_LIFETIME, in_len=16)[1][16] == Status.UNSUPP


def test_write_zeroes_and_discard(h, disk):
    assert h.request(RequestType.WRITE_ZEROES, out=SEGMENT.pack(8, 16, 0))[1][0] == Status.OK
    assert disk.read_bytes()[8 * 512 : 24 * 512] == bytes(16 * 512)
    assert h.request(RequestType.WRITE_ZEROES, out=SEGMENT.pack(40, 8, 1))[1][0] == Status.OK
    assert disk.read_bytes()[40 * 512 : 48 * 512] == bytes(8 * 512)
    if h.dev.image.can_discard:
        assert h.request(RequestType.DISCARD, out=SEGMENT.pack(64, 8, 0))[1][0] == Status.OK
        assert disk.read_bytes()[64 * 512 : 72 * 512] == bytes(8 * 512)
        assert h.request(RequestType.DISCARD, out=SEGMENT.pack(64, 8, 1))[1][0] == Status.UNSUPP
    # bad segments: past the end, too many, unknown flags, ragged payload
    assert h.request(RequestType.WRITE_ZEROES, out=SEGMENT.pack(DISK_SECTORS - 1, 2, 0))[1][0] == Status.IOERR
    assert h.request(RequestType.WRITE_ZEROES, out=SEGMENT.pack(0, 1, 0) * 33)[1][0] == Status.IOERR
    assert h.request(RequestType.WRITE_ZEROES, out=SEGMENT.pack(0, 1, 4))[1][0] == Status.UNSUPP
    assert h.request(RequestType.WRITE_ZEROES, out=b"\0" * 10)[1][0] == Status.IOERR


def test_malformed_chains(h, disk):
    before = disk.read_bytes()
    # no status byte: completed with length 0, queue goes on
    h.q.add_chain([(HEADER.pack(RequestType.IN, 0, 0), False)])
    h.dev._process()
    assert h.q.take_used()[0][1] == 0
    # header too short
    head = h.q.add_chain([(b"\1\0\0", False), (1, True)])
    status_addr = h.q.bufs[head][-1].addr
    h.dev._process()
    (_, length, _), = h.q.take_used()
    assert (length, h.mem.read_u8(status_addr)) == (1, Status.IOERR)
    # an OUT with a writable data buffer, an IN with readable data
    assert h.request(RequestType.OUT, in_len=512)[1][512] == Status.IOERR
    assert h.request(RequestType.IN, out=b"\0" * 512)[1][0] == Status.IOERR
    assert disk.read_bytes() == before
    assert h.read(0, 512)[0] == Status.OK and not h.dev.broken


def test_bad_images_refused(tmp_path):
    with pytest.raises(DiskImageError):
        BlockDevice(tmp_path / "missing.img")
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(DiskImageError):
        BlockDevice(odd)
    with pytest.raises(DiskImageError):
        BlockDevice(tmp_path)  # a directory


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(min_size=0, max_size=40), payload=st.binary(max_size=1100),
       in_len=st.integers(0, 2000), status_len=st.integers(0, 3))
def test_fuzzed_requests_never_break_the_device(h, disk, header, payload, in_len, status_len):
    parts = [(header, False)] if header else []
    if payload:
        parts.append((payload, False))
    if in_len:
        parts.append((in_len, True))
    if status_len:
        parts.append((status_len, True))
    if not parts:
        return
    h.q.add_chain(parts)
    h.dev._process()
    (_, length, data), = h.q.take_used()
    writable = in_len + status_len
    assert 0 <= length <= writable
    assert not h.dev.broken
    assert os.path.getsize(disk) == DISK_SECTORS * 512


def _raw_chain(h, descs: list[tuple[int, int, bool]]) -> tuple[int, int]:
    """Publish a chain of raw (addr, len, writable) descriptors, run the device; (used len, status byte)."""
    from katapy.vmm.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

    ids = [h.q.free.pop(0) for _ in descs]
    for i, (addr, length, writable) in enumerate(descs):
        last = i == len(descs) - 1
        h.q.write_desc(h.q.desc, ids[i], addr, length, (VIRTQ_DESC_F_WRITE if writable else 0)
                       | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else ids[i + 1])
    h.q.publish(ids[0])
    h.dev._process()
    (head, length, _), = h.q.take_used()
    h.q.free += ids[1:]  # take_used returned the head only (no bufs recorded for a raw chain)
    addr, n, _ = descs[-1]
    return length, h.mem.read_u8(addr + n - 1)


@pytest.mark.parametrize("rtype", [RequestType.WRITE_ZEROES, RequestType.DISCARD])
def test_oversized_segment_payload_is_refused_before_it_is_read(h, disk, rtype):
    """A DISCARD/WRITE_ZEROES payload longer than max_*_seg segments (5.2.6.2) is IOERR, and the
    device never copies it into host memory: 16 descriptors naming the same 4 MiB of guest RAM
    must not make the VMM allocate 64 MiB (a 1024-entry chain over all of RAM would exhaust the host)."""
    import tracemalloc

    if rtype == RequestType.DISCARD and not h.dev.image.can_discard:
        pytest.skip("the file system under the test image cannot punch holes: DISCARD is not offered")
    before = disk.read_bytes()
    hdr_addr, status_addr = 0x700000, 0x700100
    h.mem.write(hdr_addr, HEADER.pack(rtype, 0, 0))
    h.mem.write(0x100000, SEGMENT.pack(0, 8, 0) * 2)  # plausible segments at the start of each copy
    descs = [(hdr_addr, HEADER.size, False)] + [(0x100000, 4 << 20, False)] * 16 + [(status_addr, 1, True)]
    tracemalloc.start()
    try:
        length, status = _raw_chain(h, descs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (length, status) == (1, Status.IOERR)
    assert peak < 1 << 20, f"the device copied {peak} bytes of an invalid payload into host memory"
    assert disk.read_bytes() == before and not h.dev.broken


def test_full_queue_is_served_in_batches_that_let_other_fds_run(disk):
    """A driver that keeps the request queue full must not hold the device loop: at most BATCH
    requests per turn, the rest re-scheduled through the loop, so another fd on the same loop
    (the vsock agent traffic of the same VM) is served between batches.  Every request completes
    exactly once with the right data, and each batch updates the used ring and interrupts (2.7.8,
    2.7.7)."""
    n = 3 * BATCH + 5
    img = disk.read_bytes()
    mem = GuestMemory.create([(0, 8 << 20)])
    dev = BlockDevice(disk)
    dev.ack_features(dev.avail_features() & ~(1 << VIRTIO_F_EVENT_IDX))  # an interrupt for every batch
    q = DriverQueue(mem, 0x1000, 0x100000, 0x600000, size=QUEUE_SIZE)
    kick, call, other = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
    loop = EventLoop("test-blk-batch")
    progress: list[int] = []  # requests the device had served each time the other fd ran

    def on_other(fd: int, events: int) -> None:
        progress.append(dev.stats["requests"])
        if dev.stats["requests"] >= n:
            os.eventfd_read(fd)  # level-triggered: readable (and served every turn) until now

    def kick_both() -> None:  # on the loop thread, so both fds are ready in the same epoll turn
        os.eventfd_write(other, 1)
        os.eventfd_write(kick, 1)

    loop.start()
    try:
        loop.run_sync(lambda: dev.activate(mem, [q.state(QUEUE_SIZE)], [kick], EventFdInterrupt({0: call}), loop))
        try:
            os.eventfd_read(call)  # activation's own check of the (empty) queue
        except BlockingIOError:
            pass
        loop.add(other, on_other)
        heads = {q.add_chain([(HEADER.pack(RequestType.IN, 0, i), False), (512, True), (1, True)]): i
                 for i in range(n)}
        loop.run_sync(kick_both)
        used: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + 15
        while len(used) < n and time.monotonic() < deadline:
            used += q.take_used()
            time.sleep(0.01)
        time.sleep(0.1)
        used += q.take_used()
        loop.run_sync(lambda: None)  # whatever the device scheduled has run
        interrupts = os.eventfd_read(call)
    finally:
        dev.close()
        loop.close()
        for fd in (kick, call, other):
            os.close(fd)
        mem.close()
    assert sorted(h for h, _, _ in used) == sorted(heads), "a request was lost or completed twice"
    for head, length, data in used:
        sector = heads[head]
        assert length == 513 and data == img[sector * 512 : sector * 512 + 512] + bytes([Status.OK])
    assert dev.stats["requests"] == n
    between = sorted({p for p in progress if 0 < p < n})
    assert between == [BATCH * k for k in range(1, n // BATCH + 1)], \
        f"the other fd saw progress {sorted(set(progress))}: not served between batches of {BATCH}"
    assert interrupts == -(-n // BATCH)  # one per batch: the driver sees each batch's completions


def _many_segments(h, rtype, count: int) -> tuple[int, int]:
    """One request whose data is ``count`` 512-byte descriptors (in an indirect table, as Linux
    sends long requests); the device runs it.  (used length, status byte)."""
    data = [(os.urandom(512), False) for _ in range(count)] if rtype == RequestType.OUT else [(512, True)] * count
    head = h.q.add_chain([(HEADER.pack(rtype, 0, 0), False), *data, (1, True)], indirect=True)
    status_addr = h.q.bufs[head][-1].addr
    h.dev._process()
    (used_head, length, _), = h.q.take_used()
    assert used_head == head
    return length, h.mem.read_u8(status_addr)


def _seg_max_warnings(logs) -> int:
    return sum(1 for e in logs if e["log_level"] == "warning" and "seg_max" in e["event"])


def test_requests_over_seg_max_fail_and_are_logged_once(h, disk):
    """seg_max (5.2.4) bounds the data segments of a request; a driver that goes over it gets
    IOERR for that request (the chain is consumed, nothing touches the disk, the queue goes on),
    and the device warns once, not once per request the guest sends."""
    assert h.dev.has_feature(VIRTIO_BLK_F_SEG_MAX)
    assert CONFIG.unpack(h.dev.config_space()[: CONFIG.size])[2] == SEG_MAX
    before = disk.read_bytes()
    with structlog.testing.capture_logs() as logs:
        for rtype in (RequestType.OUT, RequestType.IN, RequestType.OUT):
            assert _many_segments(h, rtype, SEG_MAX + 1) == (1, Status.IOERR)
    assert disk.read_bytes() == before
    assert _seg_max_warnings(logs) == 1
    payload = os.urandom(SEG_MAX * 512)
    assert h.write(0, payload, split=512, indirect=True) == Status.OK  # exactly seg_max is fine
    assert disk.read_bytes()[: SEG_MAX * 512] == payload
    assert _many_segments(h, RequestType.IN, SEG_MAX) == (SEG_MAX * 512 + 1, Status.OK)
    assert not h.dev.broken


def test_without_seg_max_the_queue_size_bounds_segments(disk):
    """A driver that did not accept VIRTIO_BLK_F_SEG_MAX is bound by the queue instead: no chain
    longer than the queue size (2.7.5.3.1), so no more data segments than that either."""
    probe = BlockDevice(disk)
    offered = probe.avail_features()
    probe.close()
    hs = BlkHarness(disk, features=offered & ~(1 << VIRTIO_BLK_F_SEG_MAX))
    try:
        assert not hs.dev.has_feature(VIRTIO_BLK_F_SEG_MAX)
        size = hs.q.size
        assert _many_segments(hs, RequestType.IN, size + 1) == (1, Status.IOERR)
        assert _many_segments(hs, RequestType.IN, size) == (size * 512 + 1, Status.OK)
        assert not hs.dev.broken
    finally:
        hs.close()
