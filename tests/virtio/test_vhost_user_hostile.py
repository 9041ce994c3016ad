"""A hostile vhost-user front end against VhostUserServer over a real unix socket (QEMU docs/interop/vhost-user.rst).

The front end here is written from the spec's wire facts: a 12-byte header
``u32 request, u32 flags, u32 size`` (version 0x1 in flags bits 0-1, REPLY bit 2,
NEED_REPLY bit 3), a payload of ``size`` bytes, fds as SCM_RIGHTS on the header.
Every bad message must end in a logged disconnect (or, with REPLY_ACK
negotiated and NEED_REPLY set, an error reply); the server must then accept a
well-behaved front end that moves a real virtio-blk request through guest RAM
it shared by memfd, and the process must hold exactly the fds it held before.
"""
from __future__ import annotations

import array
import os
import socket
import struct
import tempfile
import time

import pytest
import structlog

from katapy.testing import fds
from katapy.vmm.memory import GuestMemory, GuestMemoryError
from katapy.vmm.virtio.blk import BlockDevice
from katapy.vmm.virtio.blk.request import HEADER as BLK_HEADER, RequestType, Status
from katapy.vmm.virtio.device import VIRTIO_F_VERSION_1
from katapy.vmm.virtio.vhost_user import VhostUserServer
from katapy.vmm.virtio.vhost_user.protocol import F_PROTOCOL_FEATURES, ProtocolFeature, Request

from .driver import DriverQueue

VERSION, REPLY, NEED_REPLY = 0x1, 1 << 2, 1 << 3
RAM = 1 << 20
USER_BASE = 0x7F00_0000_0000  # the front end's (made-up) virtual address of guest RAM
RING, DATA = 0x1000, 0x10000
QSIZE = 16
SECTOR = 512


class FrontEnd:
    """One vhost-user front-end connection, speaking raw bytes."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(8)
        self.sock.connect(path)

    def raw(self, data: bytes, fds: list[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def send(self, req: int, payload: bytes = b"", fds: list[int] = (), flags: int = VERSION,
             size: int | None = None) -> None:
        self.raw(struct.pack("<III", req, flags, len(payload) if size is None else size) + payload, fds)

    def reply(self, req: int) -> bytes:
        hdr = self._exact(12)
        r, flags, size = struct.unpack("<III", hdr)
        assert r == req and flags & REPLY and flags & 3 == VERSION
        return self._exact(size)

    def call(self, req: int, payload: bytes = b"") -> bytes:
        self.send(req, payload)
        return self.reply(req)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "the back end closed the connection"
            buf += chunk
        return buf

    def disconnected(self) -> bool:
        """True once the back end has closed its end (EOF or reset) without sending anything."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def vring_state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def mem_table(regions: list[tuple[int, int, int, int]]) -> bytes:
    """regions: (guest_phys_addr, memory_size, userspace_addr, mmap_offset)."""
    return struct.pack("<II", len(regions), 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)


def memfd(size: int = RAM) -> int:
    fd = os.memfd_create("hostile-front-end", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * (64 * SECTOR // 256))
    return p


@pytest.fixture
def server(tmp_path, disk):
    before = fds.snapshot()
    srv = VhostUserServer(BlockDevice(disk, read_only=False), tmp_path / "vu.sock")
    srv.start()
    with structlog.testing.capture_logs() as logs:
        srv.logs = logs
        try:
            yield srv
        finally:
            srv.stop()
    # the loop's last resort, or the server's catch-all for an exception no handler expected
    escaped = [e for e in logs if e.get("event") == "device callback failed; fd dropped" or e.get("exc_info")]
    assert not escaped, f"an unexpected exception in the vhost-user server: {escaped}"
    fds.wait_released(before)  # the server leaked nothing


def good_session(srv: VhostUserServer) -> None:
    """A well-behaved front end: negotiate, share RAM by memfd, start queue 0, read sector 3 through it."""
    fe = FrontEnd(srv.socket_path)
    fd = memfd()
    mem = GuestMemory.from_fds([(0, RAM, os.dup(fd), 0)])
    kick, call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        feats = struct.unpack("<Q", fe.call(Request.GET_FEATURES))[0]
        assert feats >> VIRTIO_F_VERSION_1 & 1 and feats >> F_PROTOCOL_FEATURES & 1
        fe.send(Request.SET_FEATURES, u64(1 << VIRTIO_F_VERSION_1))
        fe.send(Request.SET_OWNER)
        fe.send(Request.SET_MEM_TABLE, mem_table([(0, RAM, USER_BASE, 0)]), [fd])
        q = DriverQueue(mem, RING, DATA, 0x40000, size=QSIZE)
        fe.send(Request.SET_VRING_NUM, vring_state(0, QSIZE))
        fe.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, USER_BASE + q.desc, USER_BASE + q.used,
                                                    USER_BASE + q.avail, 0))
        fe.send(Request.SET_VRING_BASE, vring_state(0, 0))
        fe.send(Request.SET_VRING_CALL, u64(0), [call])
        fe.send(Request.SET_VRING_KICK, u64(0), [kick])
        head = q.add_chain([(BLK_HEADER.pack(RequestType.IN, 0, 3), False), (SECTOR, True), (1, True)])
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + 8
        used: list = []
        while not used:
            assert time.monotonic() < deadline, "the good front end's request was never completed"
            used = q.take_used()
            time.sleep(0.005)
        (h, length, data), = used
        assert h == head and data[SECTOR] == Status.OK
        assert data[:SECTOR] == (bytes(range(256)) * 2)
        assert os.eventfd_read(call) >= 1
    finally:
        fe.close()
        mem.close()
        os.close(fd)
        os.close(kick)
        os.close(call)


def logged(srv: VhostUserServer, fragment: str) -> bool:
    return any(fragment in str(e) for e in srv.logs)


# -- the hostile sessions: each sends its abuse on a fresh connection --------------
def _fds_on_message(fe: FrontEnd, req: int, n: int, payload: bytes = u64(0)) -> None:
    fds = [memfd(4096) for _ in range(n)]
    fe.send(req, payload, fds)
    for f in fds:
        os.close(f)  # ours; the server must close its copies


def _mem_table_with(fe: FrontEnd, regions, nfds: int | None = None, fd_factory=memfd) -> None:
    fds = [fd_factory() for _ in range(len(regions) if nfds is None else nfds)]
    fe.send(Request.SET_MEM_TABLE, mem_table(regions), fds)
    for f in fds:
        os.close(f)


def _unmappable_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _readonly_file_fd() -> int:
    f = tempfile.TemporaryFile()
    f.truncate(RAM)
    fd = os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY)
    f.close()
    return fd


HOSTILE = {
    "truncated-header": lambda fe: fe.raw(b"\x01\x00\x00\x00\x01"),
    "version-0": lambda fe: fe.send(Request.GET_FEATURES, flags=0),
    "version-2": lambda fe: fe.send(Request.GET_FEATURES, flags=2),
    "version-3-need-reply": lambda fe: fe.send(Request.GET_FEATURES, flags=3 | NEED_REPLY),
    "size-over-max": lambda fe: fe.send(Request.SET_FEATURES, u64(0), size=1 << 20),
    "size-lies-long": lambda fe: fe.send(Request.SET_FEATURES, u64(0), size=64),  # then we close mid-payload
    "size-lies-short": lambda fe: fe.send(Request.SET_FEATURES, b"", size=0),
    "unknown-request": lambda fe: fe.send(9999),
    "unoffered-features": lambda fe: fe.send(Request.SET_FEATURES, u64(1 << 63)),
    "fds-on-get-features": lambda fe: _fds_on_message(fe, Request.GET_FEATURES, 3),
    "extra-fds-on-kick": lambda fe: _fds_on_message(fe, Request.SET_VRING_KICK, 2),
    "kick-without-fd": lambda fe: fe.send(Request.SET_VRING_KICK, u64(0)),
    "kick-polling-mode": lambda fe: fe.send(Request.SET_VRING_KICK, u64(0x100)),
    "nine-fds": lambda fe: _fds_on_message(fe, Request.SET_VRING_CALL, 9),
    "mem-table-zero-regions": lambda fe: _mem_table_with(fe, []),
    "mem-table-nine-regions": lambda fe: _mem_table_with(fe, [(i * RAM, RAM, USER_BASE + i * RAM, 0)
                                                              for i in range(9)], nfds=8),
    "mem-region-size-0": lambda fe: _mem_table_with(fe, [(0, 0, USER_BASE, 0)]),
    "mem-regions-overlap": lambda fe: _mem_table_with(fe, [(0, RAM, USER_BASE, 0), (RAM // 2, RAM, USER_BASE + RAM, 0)]),
    "mem-region-past-52-bits": lambda fe: _mem_table_with(fe, [((1 << 52) - 4096, RAM, USER_BASE, 0)]),
    "mem-fd-missing": lambda fe: _mem_table_with(fe, [(0, RAM, USER_BASE, 0)], nfds=0),
    "mem-fd-extra": lambda fe: _mem_table_with(fe, [(0, RAM, USER_BASE, 0)], nfds=2),
    "mem-fd-pipe": lambda fe: _mem_table_with(fe, [(0, RAM, USER_BASE, 0)], fd_factory=_unmappable_fd),
    "mem-fd-read-only": lambda fe: _mem_table_with(fe, [(0, RAM, USER_BASE, 0)], fd_factory=_readonly_file_fd),
    "mem-fd-too-small": lambda fe: _mem_table_with(fe, [(0, 4 * RAM, USER_BASE, 0)]),
    "mem-offset-huge": lambda fe: _mem_table_with(fe, [(0, RAM, USER_BASE, 1 << 63)]),
    "mem-table-short": lambda fe: _fds_on_message(fe, Request.SET_MEM_TABLE, 1, struct.pack("<II", 1, 0) + u64(0)),
    "vring-num-over-max": lambda fe: fe.send(Request.SET_VRING_NUM, vring_state(0, 2048)),
    "vring-num-not-power-of-2": lambda fe: fe.send(Request.SET_VRING_NUM, vring_state(0, 100)),
    "vring-num-zero": lambda fe: fe.send(Request.SET_VRING_NUM, vring_state(0, 0)),
    "vring-index-out-of-range": lambda fe: fe.send(Request.SET_VRING_NUM, vring_state(7, 16)),
    "vring-base-over-16-bits": lambda fe: fe.send(Request.SET_VRING_BASE, vring_state(0, 1 << 16)),
    "vring-addr-without-memory": lambda fe: fe.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, USER_BASE,
                                                                                         USER_BASE, USER_BASE, 0)),
    "vring-addr-short": lambda fe: fe.send(Request.SET_VRING_ADDR, b"\0" * 20),
    "config-out-of-range": lambda fe: fe.send(Request.GET_CONFIG, struct.pack("<III", 0, 1 << 20, 0)),
    "log-base": lambda fe: _fds_on_message(fe, Request.SET_LOG_BASE, 1, u64(0) * 2),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_message_disconnects_and_server_recovers(server, case):
    before = fds.snapshot()
    fe = FrontEnd(server.socket_path)
    try:
        HOSTILE[case](fe)
        if case in ("truncated-header", "size-lies-long"):
            fe.sock.shutdown(socket.SHUT_WR)  # the rest of the message never comes
        assert fe.disconnected(), f"{case}: the back end kept a front end that sent garbage"
    finally:
        fe.close()
    fds.wait_released(before)
    assert logged(server, "front end disconnected")
    good_session(server)
    fds.wait_released(before)


def test_ring_outside_the_region_refuses_activation_but_keeps_serving(server):
    """Vring addresses inside the table whose rings run past the region: the device is not started."""
    before = fds.snapshot()
    fe = FrontEnd(server.socket_path)
    fd, kick = memfd(), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.send(Request.SET_MEM_TABLE, mem_table([(0, RAM, USER_BASE, 0)]), [fd])
        fe.send(Request.SET_VRING_NUM, vring_state(0, 1024))
        last = USER_BASE + RAM - 64
        fe.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, last, last, last, 0))
        fe.send(Request.SET_VRING_KICK, u64(0), [kick])
        assert struct.unpack("<Q", fe.call(Request.GET_FEATURES))[0]  # still answering
        assert logged(server, "device refused to activate")
        assert not server._active
    finally:
        fe.close()
        os.close(fd)
        os.close(kick)
    fds.wait_released(before)
    good_session(server)


def test_kick_before_memory_starts_nothing(server):
    before = fds.snapshot()
    fe = FrontEnd(server.socket_path)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.send(Request.SET_VRING_NUM, vring_state(0, QSIZE))
        fe.send(Request.SET_VRING_KICK, u64(0), [kick])
        os.eventfd_write(kick, 1)
        assert fe.call(Request.GET_QUEUE_NUM) == u64(1)
        assert not server._active
    finally:
        fe.close()
        os.close(kick)
    fds.wait_released(before)
    good_session(server)


def test_reply_ack_turns_failures_into_error_replies(server):
    """With REPLY_ACK negotiated, a failed request with NEED_REPLY gets u64 1 and the connection stays."""
    fe = FrontEnd(server.socket_path)
    try:
        fe.send(Request.SET_FEATURES, u64(1 << F_PROTOCOL_FEATURES | 1 << VIRTIO_F_VERSION_1))
        proto = struct.unpack("<Q", fe.call(Request.GET_PROTOCOL_FEATURES))[0]
        assert proto >> ProtocolFeature.REPLY_ACK & 1
        fe.send(Request.SET_PROTOCOL_FEATURES, u64(1 << ProtocolFeature.REPLY_ACK))
        fe.send(Request.SET_VRING_NUM, vring_state(0, 4096), flags=VERSION | NEED_REPLY)
        assert fe.reply(Request.SET_VRING_NUM) == u64(1)
        fe.send(9999, flags=VERSION | NEED_REPLY)
        assert fe.reply(9999) == u64(1)
        fe.send(Request.SET_VRING_NUM, vring_state(0, QSIZE), flags=VERSION | NEED_REPLY)
        assert fe.reply(Request.SET_VRING_NUM) == u64(0)
    finally:
        fe.close()
    good_session(server)


def test_stalled_message_times_out_and_the_server_recovers(server):
    """A header promising a payload that never comes: bounded by the server's message timeout."""
    fe = FrontEnd(server.socket_path)
    try:
        t0 = time.monotonic()
        fe.send(Request.SET_FEATURES, b"\0\0", size=8)
        assert fe.disconnected()
        assert time.monotonic() - t0 < 8
    finally:
        fe.close()
    good_session(server)


def test_second_front_end_is_refused_while_one_is_connected(server):
    first = FrontEnd(server.socket_path)
    try:
        assert first.call(Request.GET_QUEUE_NUM) == u64(1)
        second = FrontEnd(server.socket_path)
        try:
            assert second.disconnected()
        finally:
            second.close()
        assert first.call(Request.GET_QUEUE_NUM) == u64(1)
    finally:
        first.close()
    good_session(server)


def test_unpollable_kick_fd_is_refused(server):
    """A kick 'eventfd' that epoll cannot watch (a regular file)."""
    before = fds.snapshot()
    fe = FrontEnd(server.socket_path)
    fd = memfd()
    f = tempfile.TemporaryFile()
    try:
        fe.send(Request.SET_MEM_TABLE, mem_table([(0, RAM, USER_BASE, 0)]), [fd])
        fe.send(Request.SET_VRING_NUM, vring_state(0, QSIZE))
        fe.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, USER_BASE + RING, USER_BASE + RING + 0x200,
                                                    USER_BASE + RING + 0x100, 0))
        fe.send(Request.SET_VRING_KICK, u64(0), [f.fileno()])
        assert fe.disconnected()
    finally:
        fe.close()
        f.close()
        os.close(fd)
    fds.wait_released(before)
    good_session(server)


def test_region_past_the_end_of_its_fd_is_refused_not_mapped(server):
    """Found by fuzz/targets/vhost_user.py's design review: a region larger than its memfd mapped
    fine, and the first ring access past the file's end would SIGBUS the whole back end."""
    before = fds.snapshot()
    fe = FrontEnd(server.socket_path)
    fd = memfd(RAM // 2)
    try:
        fe.send(Request.SET_MEM_TABLE, mem_table([(0, RAM, USER_BASE, 0)]), [fd])
        assert fe.disconnected(), "a region past the end of its fd was accepted"
    finally:
        fe.close()
        os.close(fd)
    fds.wait_released(before)
    assert logged(server, "runs past the end")
    good_session(server)


def test_guest_memory_from_fds_refuses_a_region_past_the_file_end():
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    try:
        with pytest.raises(GuestMemoryError, match="past the end"):
            GuestMemory.from_fds([(0, 8192, fd, 0)])
        with pytest.raises(GuestMemoryError, match="past the end"):
            GuestMemory.from_fds([(0, 4096, fd, 4096)])
    finally:
        os.close(fd)
