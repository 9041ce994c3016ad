"""Hostile virtio-vsock drivers: hand-built packets through real rings into VsockDevice (virtio 1.2, 5.10.6).

A :class:`VsockRig` plays the guest over a GuestMemory (tests/virtio/driver.py)
while the device runs on its own started EventLoop thread with real unix
sockets behind the muxer.  Every example checks the spec's answer (an RST for
a packet that names no connection, nothing for a spoofed source or an RST,
nothing for a malformed chain), that no callback raised (the loop logs
"device callback failed" when one does), and that a bystander connection set
up before the abuse still carries bytes both ways.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
import structlog
from hypothesis import HealthCheck, given, settings, strategies as st

from katapy.testing import fds
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory
from katapy.vmm.virtio.device import VIRTIO_F_VERSION_1, EventFdInterrupt
from katapy.vmm.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from katapy.vmm.virtio.vsock import VsockDevice
from katapy.vmm.virtio.vsock.muxer import MAX_CONNECTIONS, MAX_PENDING_RSTS
from katapy.vmm.virtio.vsock.packet import (
    HDR_SIZE, MAX_PKT_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, TYPE_STREAM, VSOCK_HOST_CID, Header,
)

from .driver import DriverQueue

CID = 42
LISTEN_PORT = 5000  # the only host port with a unix listener (<uds>_5000)
BYSTANDER_GUEST_PORT = 7777
RX_BUF = HDR_SIZE + 4096
RX_POSTED = 48
U32 = 0xFFFFFFFF
WAIT_S = 5.0


class VsockRig:
    """A guest driver for a live VsockDevice: rx (0), tx (1), event (2) queues in 16 MiB of RAM."""

    def __init__(self, tmp_path):
        self.mem = GuestMemory.create([(0, 16 << 20)])
        self.uds = str(tmp_path / "vsock.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(f"{self.uds}_{LISTEN_PORT}")
        self.listener.listen(2048)
        self.dev = VsockDevice(CID, self.uds)
        self.dev.ack_features(1 << VIRTIO_F_VERSION_1)
        self.rx = DriverQueue(self.mem, 0x1000, 0x100000, 0x400000, size=64)
        self.tx = DriverQueue(self.mem, 0x8000, 0x500000, 0x400000, size=64)
        self.evq = DriverQueue(self.mem, 0xC000, 0xA00000, 0x10000, size=16)
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
        self.calls = {i: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for i in range(3)}
        self.loop = EventLoop(name="vsock-fuzz")
        self.loop.start()
        self.tx_sent = 0
        self.on_loop(lambda: self.dev.activate(
            self.mem, [self.rx.state(1024), self.tx.state(1024), self.evq.state(1024)], self.kicks,
            EventFdInterrupt(self.calls), self.loop))
        self.post_rx(RX_POSTED)

    # -- plumbing --------------------------------------------------------------
    def on_loop(self, fn) -> None:
        """Run ``fn`` on the device's loop thread and wait; also a barrier behind queued callbacks."""
        done, err = threading.Event(), []

        def run():
            try:
                fn()
            except BaseException as e:  # surfaced on the test thread
                err.append(e)
            finally:
                done.set()

        self.loop.call_soon(run)
        assert done.wait(WAIT_S), "device loop did not run a callback in time (hung?)"
        if err:
            raise err[0]

    def post_rx(self, n: int) -> None:
        for _ in range(n):
            self.rx.add_chain([(RX_BUF, True)])
        os.eventfd_write(self.kicks[0], 1)

    def send_raw(self, parts: list[tuple[bytes | int, bool]]) -> None:
        """Publish one TX chain, kick, and wait until the device completed it and finished the batch."""
        self.tx.add_chain(parts)
        self.complete_tx()

    def complete_tx(self) -> list[tuple[int, int, bytes]]:
        """Kick TX for one published chain; wait until it is used and the device's batch has returned."""
        self.tx_sent = (self.tx_sent + 1) & 0xFFFF
        os.eventfd_write(self.kicks[1], 1)
        deadline = time.monotonic() + WAIT_S
        while self.mem.read_u16(self.tx.used + 2) != self.tx_sent:
            assert time.monotonic() < deadline, "TX chain never completed: the device stopped serving its queue"
            time.sleep(0.0005)
        self.on_loop(lambda: None)  # the kick callback (and the RX batch it runs) has returned
        return self.tx.take_used()

    def send(self, hdr: Header, payload: bytes = b"", split: int = 0) -> None:
        raw = hdr.pack() + payload
        if split:
            split = max(split, -(-len(raw) // 32))  # at most 32 descriptors: half the TX ring
            self.send_raw([(raw[i : i + split], False) for i in range(0, len(raw), split)] or [(b"", False)])
        else:
            self.send_raw([(raw, False)])

    def received(self) -> list[tuple[Header, bytes]]:
        """Packets the device put on the RX queue since the last call (buffers are re-posted)."""
        out = []
        used = self.rx.take_used()
        for _head, length, data in used:
            assert HDR_SIZE <= length <= RX_BUF, f"used length {length} outside the posted buffer"
            h = Header.unpack(data[:HDR_SIZE])
            assert h.len == length - HDR_SIZE
            out.append((h, data[HDR_SIZE:length]))
        if used:
            self.post_rx(len(used))
        return out

    def wait_received(self, pred, what: str) -> list[tuple[Header, bytes]]:
        got: list[tuple[Header, bytes]] = []
        deadline = time.monotonic() + WAIT_S
        while not pred(got):
            assert time.monotonic() < deadline, f"no {what} from the device; got {got}"
            self.on_loop(lambda: None)
            got += self.received()
            time.sleep(0.001)
        return got

    def guest(self, src_port: int, dst_port: int, op: int, **kw) -> Header:
        fields = dict(src_cid=CID, dst_cid=VSOCK_HOST_CID, src_port=src_port, dst_port=dst_port, len=0,
                      type=TYPE_STREAM, op=op, flags=0, buf_alloc=1 << 20, fwd_cnt=0)
        fields.update(kw)
        return Header(**fields)

    def close(self) -> None:
        self.on_loop(self.dev.close)
        self.loop.close()
        self.listener.close()
        for fd in self.kicks + list(self.calls.values()):
            os.close(fd)
        self.mem.close()


class Bystander:
    """A guest-initiated connection (guest port BYSTANDER_GUEST_PORT -> host LISTEN_PORT) kept alive."""

    def __init__(self, rig: VsockRig, guest_port: int = BYSTANDER_GUEST_PORT):
        self.rig, self.port = rig, guest_port
        self.fwd_cnt = 0
        rig.send(rig.guest(guest_port, LISTEN_PORT, OP_REQUEST))
        got = rig.wait_received(lambda g: any(h.op == OP_RESPONSE for h, _ in g), "RESPONSE")
        assert [(h.op, h.src_port, h.dst_port) for h, _ in got] == [(OP_RESPONSE, LISTEN_PORT, guest_port)]
        rig.listener.settimeout(WAIT_S)
        self.host, _ = rig.listener.accept()
        self.host.settimeout(WAIT_S)
        self.n = 0

    def check(self, others: list[tuple[Header, bytes]] = ()) -> None:
        """Bytes still flow both ways on this connection."""
        rig = self.rig
        self.n += 1
        msg = f"ping {self.n}".encode()
        rig.send(rig.guest(self.port, LISTEN_PORT, OP_RW, len=len(msg), fwd_cnt=self.fwd_cnt), msg)
        got = b""
        while len(got) < len(msg):
            got += self.host.recv(len(msg) - len(got))
        assert got == msg
        self.host.sendall(b"pong")
        pkts = rig.wait_received(lambda g: any(h.op == OP_RW and h.dst_port == self.port for h, _ in g), "pong")
        data = b"".join(p for h, p in pkts if h.op == OP_RW and h.dst_port == self.port)
        assert data == b"pong"
        self.fwd_cnt = (self.fwd_cnt + len(data)) & U32
        # anything else on the queue must be credit bookkeeping for this connection, never an RST
        for h, _ in pkts:
            if h.dst_port == self.port:
                assert h.op in (OP_RW, OP_CREDIT_UPDATE), h

    def close(self) -> None:
        self.host.close()


@pytest.fixture
def rig(tmp_path):
    r = VsockRig(tmp_path)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def loop_errors():
    """Log events of callbacks the EventLoop had to catch (an exception escaped a device handler)."""
    with structlog.testing.capture_logs() as logs:
        yield logs
    escaped = [e for e in logs if e.get("event") == "device callback failed; fd dropped"]
    assert not escaped, escaped


# -- the oracle --------------------------------------------------------------
def expected_reply(h: Header, chain_payload: int) -> str:
    """What virtio 1.2 5.10.6 (and the hybrid-vsock host) owes for one packet on no known connection.

    'drop': malformed or not ours to answer; 'rst': a reset back to the sender.
    """
    if h.len > MAX_PKT_PAYLOAD or h.len > chain_payload:
        return "drop"  # not a well-formed packet: nothing to answer
    if h.src_cid != CID:
        return "drop"  # a spoofed source cid is not answered (it names no socket of this guest)
    if h.op == OP_RST:
        return "drop"  # never answer an RST with an RST
    return "rst"  # unknown op/type/dst cid, or a packet for a connection that does not exist


cids = st.one_of(st.sampled_from([CID, CID, VSOCK_HOST_CID, 0, 1, 3, CID + 1, U32, 1 << 32 | CID, 2**64 - 1]),
                 st.integers(0, 2**64 - 1))
ports = st.one_of(st.sampled_from([0, 1, 1023, 1024, U32, 1 << 30, (1 << 30) + 1]), st.integers(0, U32))
ops = st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF))
types = st.one_of(st.just(TYPE_STREAM), st.integers(0, 0xFFFF))
u32s = st.one_of(st.sampled_from([0, 1, U32, 1 << 31]), st.integers(0, U32))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(src_cid=cids, dst_cid=st.one_of(st.just(VSOCK_HOST_CID), cids), src_port=ports, dst_port=ports,
       type_=types, op=ops, flags=u32s, buf_alloc=u32s, fwd_cnt=u32s,
       payload=st.binary(max_size=300), len_delta=st.one_of(st.just(0), st.integers(-300, 300), st.just(U32)),
       split=st.sampled_from([0, 0, 1, 7, 44, 45]))
def test_hostile_header_gets_the_spec_answer_and_harms_no_one(tmp_path_factory, src_cid, dst_cid, src_port,
                                                             dst_port, type_, op, flags, buf_alloc, fwd_cnt,
                                                             payload, len_delta, split):
    r = _shared_rig(tmp_path_factory)
    if dst_port == LISTEN_PORT and op == OP_REQUEST or src_port == BYSTANDER_GUEST_PORT:
        dst_port ^= 0x10000  # keep the bystander's port pair and the only listener out of the oracle
    length = max(0, min(U32, len(payload) + len_delta)) if len_delta != U32 else U32
    h = Header(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt)
    conns_before = set(r.rig.dev.muxer.conns)
    with structlog.testing.capture_logs() as logs:
        r.rig.send(h, payload, split)
        got = r.rig.received()
        r.bystander.check()
    assert not [e for e in logs if e.get("event") == "device callback failed; fd dropped"]
    assert not r.rig.dev.broken
    assert set(r.rig.dev.muxer.conns) == conns_before  # nothing hostile opened or closed a connection
    want = expected_reply(h, len(payload))
    if want == "drop":
        assert got == []
    else:
        (rh, rp), = got
        assert (rh.op, rh.src_cid, rh.dst_cid, rh.src_port, rh.dst_port, rh.type, rh.len, rp) == (
            OP_RST, VSOCK_HOST_CID, CID, dst_port, src_port, TYPE_STREAM, 0, b"")


class _Shared:
    def __init__(self, tmp):
        self.rig = VsockRig(tmp)
        self.bystander = Bystander(self.rig)
        self.victims = 0


_SHARED: dict[str, _Shared] = {}


def _shared_rig(factory) -> _Shared:
    """One rig for all examples of the header fuzz (a rig per example would dominate the run time)."""
    if "rig" not in _SHARED:
        _SHARED["rig"] = _Shared(factory.mktemp("vsock-fuzz"))
    return _SHARED["rig"]


@pytest.fixture(scope="module", autouse=True)
def _close_shared():
    yield
    s = _SHARED.pop("rig", None)
    if s is not None:
        s.bystander.close()
        s.rig.close()


# -- hostile packets on an established connection ---------------------------------
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from([OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST, OP_SHUTDOWN,
                                                 OP_REQUEST, OP_RESPONSE, OP_RW]),
                                u32s, u32s, st.integers(0, 7), st.integers(0, 5000)),
                      min_size=1, max_size=8))
def test_credit_lies_and_bad_ops_on_a_connection_reset_only_that_connection(tmp_path_factory, steps):
    s = _shared_rig(tmp_path_factory)
    rig = s.rig
    s.victims += 1
    victim_port = 9000 + s.victims
    victim = Bystander(rig, victim_port)
    with structlog.testing.capture_logs() as logs:
        reset = False
        for op, buf_alloc, fwd_cnt, flags, n in steps:
            payload = os.urandom(n) if op == OP_RW else b""
            rig.send(rig.guest(victim_port, LISTEN_PORT, op, len=len(payload), buf_alloc=buf_alloc,
                               fwd_cnt=fwd_cnt, flags=flags), payload)
            for h, _ in rig.received():
                assert h.dst_port == victim_port and h.src_port == LISTEN_PORT, h
                reset = reset or h.op == OP_RST
            if reset:
                break
        # the guest lied about credit (buf_alloc/fwd_cnt): the host may send at most what it claimed
        victim.host.setblocking(False)
        try:
            victim.host.send(os.urandom(100_000))
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        got = []
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            rig.on_loop(lambda: None)
            got += rig.received()
            time.sleep(0.01)
        for h, p in got:
            assert h.dst_port in (victim_port, BYSTANDER_GUEST_PORT), h
            assert len(p) <= RX_BUF - HDR_SIZE
        s.bystander.check()
    assert not [e for e in logs if e.get("event") == "device callback failed; fd dropped"]
    assert not rig.dev.broken
    # tidy: the guest resets the victim; the host end must then see EOF or a reset
    rig.send(rig.guest(victim_port, LISTEN_PORT, OP_RST))
    rig.received()
    victim.host.settimeout(WAIT_S)
    try:
        while victim.host.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    victim.close()
    assert (LISTEN_PORT, victim_port) not in rig.dev.muxer.conns


def test_rw_past_the_advertised_credit_is_reset(rig, loop_errors):
    by = Bystander(rig)
    victim = Bystander(rig, 8123)
    big = os.urandom(4096)
    sent, reset = 0, False
    # the host end never reads: once its socket buffer is full, our 256 KiB buf_alloc runs out
    while sent <= 16 << 20 and not reset:
        rig.send(rig.guest(8123, LISTEN_PORT, OP_RW, len=len(big)), big)
        sent += len(big)
        reset = any(h.op == OP_RST and h.dst_port == 8123 for h, _ in rig.received())
    assert reset, "a guest that ignores our buf_alloc must be reset"
    by.check()
    by.close()
    victim.close()


def publish_raw_descriptor(rig: VsockRig, addr: int, length: int, flags: int, nxt) -> None:
    """Publish a one-entry TX chain written field by field (``nxt='self'`` loops) and wait for its completion."""
    head = rig.tx.free.pop(0)
    rig.tx.write_desc(rig.tx.desc, head, addr, length, flags, head if nxt == "self" else 0)
    rig.tx.bufs[head] = []
    rig.tx.publish(head)
    (_, length_used, _), = rig.complete_tx()
    assert length_used == 0


def test_bad_descriptor_chains_complete_empty_and_the_queue_goes_on(rig, loop_errors):
    by = Bystander(rig)
    hdr = rig.guest(1234, 4321, OP_RW).pack()
    rig.send_raw([(hdr, False), (64, True)])  # device-writable buffer in a TX chain
    rig.send_raw([(hdr[:20], False)])  # shorter than a header
    ram_end = 16 << 20
    publish_raw_descriptor(rig, ram_end - 8, HDR_SIZE, 0, None)  # a buffer running past the end of RAM
    publish_raw_descriptor(rig, 0x600000, HDR_SIZE, VIRTQ_DESC_F_NEXT, "self")  # a chain looping on itself
    publish_raw_descriptor(rig, 2**64 - 16, 32, 0, None)  # an address that wraps around
    assert rig.received() == []
    by.check()
    by.close()


def test_rx_buffers_too_small_for_a_header_are_returned_empty(rig, loop_errors):
    for i in range(RX_POSTED):  # use up the good buffers (one RST each)
        rig.send(rig.guest(20000 + i, 30000, OP_RW))
    assert len(rig.rx.take_used()) == RX_POSTED
    for _ in range(4):
        rig.rx.add_chain([(8, True)])
    rig.rx.add_chain([(b"x" * HDR_SIZE, False), (RX_BUF, True)])  # device-readable part in an RX chain
    os.eventfd_write(rig.kicks[0], 1)
    rig.send(rig.guest(1, 2, OP_RW))  # owes an RST; none of those buffers can carry it
    assert [length for _, length, _ in rig.rx.take_used()] == [0] * 5
    rig.post_rx(4)
    got = rig.wait_received(lambda g: len(g) >= 1, "the RST once a usable buffer is posted")
    assert [(h.op, h.dst_port) for h, _ in got] == [(OP_RST, 1)]
    by = Bystander(rig)
    by.check()
    by.close()


def test_avail_index_beyond_the_ring_breaks_the_device_not_the_loop(rig, loop_errors):
    rig.mem.write_u16(rig.tx.avail + 2, (rig.tx.avail_idx + 1000) & 0xFFFF)
    os.eventfd_write(rig.kicks[1], 1)
    deadline = time.monotonic() + WAIT_S
    while not rig.dev.broken:
        assert time.monotonic() < deadline, "a driver corrupting avail.idx must put the device in a failed state"
        time.sleep(0.001)
    rig.on_loop(lambda: None)  # the loop thread is alive and serves callbacks


def test_rst_flood_without_rx_buffers_is_bounded(tmp_path, loop_errors):
    rig = VsockRig(tmp_path)
    try:
        # consume every posted RX buffer first, so the RSTs have to wait in the muxer
        for i in range(RX_POSTED):
            rig.send(rig.guest(20000 + i, 30000, OP_RW))
        assert len(rig.rx.take_used()) == RX_POSTED  # taken without re-posting
        for i in range(MAX_PENDING_RSTS * 3):
            rig.send(rig.guest(40000 + i, 30000, OP_RW))
        assert len(rig.dev.muxer._rsts) <= MAX_PENDING_RSTS
        rig.post_rx(64)
        got = rig.wait_received(lambda g: len(g) >= MAX_PENDING_RSTS, "the queued RSTs")
        rig.on_loop(lambda: None)
        got += rig.received()
        assert len(got) == MAX_PENDING_RSTS and all(h.op == OP_RST for h, _ in got)
        by = Bystander(rig)
        by.check()
        by.close()
    finally:
        rig.close()


def test_connection_flood_stops_at_the_limit_and_leaks_nothing(tmp_path, loop_errors):
    before = fds.snapshot()
    rig = VsockRig(tmp_path)
    try:
        rsts = 0
        for i in range(MAX_CONNECTIONS + 20):
            rig.send(rig.guest(50000 + i, LISTEN_PORT, OP_REQUEST))
            rsts += sum(h.op == OP_RST for h, _ in rig.received())
        assert len(rig.dev.muxer.conns) == MAX_CONNECTIONS
        assert rsts == 20
        for i in range(MAX_CONNECTIONS + 20):
            rig.send(rig.guest(50000 + i, LISTEN_PORT, OP_RST))
        rig.received()
        assert rig.dev.muxer.conns == {}
    finally:
        rig.close()
    fds.wait_released(before)
