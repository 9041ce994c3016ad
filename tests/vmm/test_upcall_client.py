"""The VMM's upcall client (katapy.vmm.upcall) against a fake guest behind a fake hybrid-vsock socket.

The fake plays both the VMM's vsock muxer and the guest's dbs-upcall server
(Kata ``src/dragonball/crates/dbs_upcall``; docs/protocols.md "upcall"): it
reads ``CONNECT 219\\n`` and either answers ``OK 1073741824\\n`` or, like the
muxer when the guest RSTs a port nobody listens on, closes the stream without a
word; then it reads the service byte, sends the CONNECT greeting and answers
0x400-byte requests as a test scripts it.  Plain host tests: no KVM.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from katapy.upcall import wire
from katapy.vmm.upcall import (
    DeviceManagerClient,
    UpcallBusy,
    UpcallChannel,
    UpcallClosed,
    UpcallConnectError,
    UpcallConnectionLost,
    UpcallError,
    UpcallProtocolError,
    UpcallRefused,
    UpcallTimeout,
)

MSG = wire.MSG_SIZE
GIB = 1 << 30


@dataclass
class Act:
    """What the fake guest does with one request."""

    send: bytes = b""
    delay: float = 0.0
    hang: bool = False  # never answer: wait until the client closes
    close: bool = False  # close the connection after sending ``send``


def ok(raw: bytes, ret: int = 0, cpu_index: int = 0) -> Act:
    return Act(wire.encode_reply(wire.Reply(wire.decode_request(raw).type, ret, cpu_index)))


@dataclass
class FakeConn:
    sock: socket.socket
    requests: list[bytes] = field(default_factory=list)
    client_eof: threading.Event = field(default_factory=threading.Event)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


class FakeGuest:
    """A unix listener at ``path`` speaking hybrid vsock + the guest side of dbs-upcall, one thread per stream."""

    def __init__(self, path: Path, *, refuse: float = 0, handshake_reply: bytes = b"OK 1073741824\n",
                 greeting: bytes | None = wire.connect_greeting(),
                 answer: Callable[[bytes], Act] = ok) -> None:
        self.path = path
        self.refuse, self.handshake_reply, self.greeting, self.answer = refuse, handshake_reply, greeting, answer
        self.connect_lines: list[bytes] = []
        self.service_bytes: list[bytes] = []
        self.conns: list[FakeConn] = []  # streams that got past the handshake
        self.overlaps = 0  # requests that arrived before the previous one was answered
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.listener.settimeout(0.02)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def requests(self) -> list[bytes]:
        return [r for c in self.conns for r in c.requests]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self._lock:
                self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._serve_inner(sock)
        except Exception as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(repr(exc))
        finally:
            sock.close()

    def _serve_inner(self, sock: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            b = sock.recv(1)
            if not b:
                return
            line += b
        with self._lock:
            self.connect_lines.append(line)
            if len(self.connect_lines) <= self.refuse:
                return  # the muxer when the guest RSTs: close without a word
        sock.sendall(self.handshake_reply)
        if not self.handshake_reply.startswith(b"OK"):
            return
        svc = _recv_exact(sock, 1)
        if svc is None:
            return
        self.service_bytes.append(svc)
        conn = FakeConn(sock)
        self.conns.append(conn)
        if self.greeting is None:  # accepted, never greets
            while sock.recv(MSG):
                pass
            conn.client_eof.set()
            return
        sock.sendall(self.greeting)
        while True:
            raw = _recv_exact(sock, MSG)
            if raw is None:
                conn.client_eof.set()
                return
            conn.requests.append(raw)
            act = self.answer(raw)
            time.sleep(act.delay)
            poller = select.poll()  # not select(): pytest may hold fds past FD_SETSIZE by now
            poller.register(sock, select.POLLIN)
            if poller.poll(0) and sock.recv(1, socket.MSG_PEEK):
                self.overlaps += 1
            if act.hang:
                while sock.recv(MSG):
                    pass
                conn.client_eof.set()
                return
            sock.sendall(act.send)
            if act.close:
                return

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(2)
        self.listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(2)
        assert not any(t.is_alive() for t in self._threads), "fake guest threads still running"
        assert not self.errors, self.errors


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "vsock.sock"


@pytest.fixture
def guests():
    started: list[FakeGuest] = []

    def start(path: Path, **kw) -> FakeGuest:
        g = FakeGuest(path, **kw)
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


def mem_req(base: int = 4 * GIB, size: int = 128 << 20) -> wire.Request:
    return wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest(base, size))


# -- the happy path -------------------------------------------------------------------
def test_add_mem_round_trip(uds, guests):
    g = guests(uds)
    with UpcallChannel(uds, connect_timeout=1, request_timeout=1) as ch:
        assert not ch.connected
        assert DeviceManagerClient(ch).add_memory(4 * GIB, 256 << 20) is None
        assert ch.connected
    assert g.connect_lines == [b"CONNECT 219\n"]
    assert g.service_bytes == [b"d"]
    [raw] = g.requests
    assert len(raw) == MSG
    assert wire.decode_request(raw) == wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest(4 * GIB, 256 << 20))


def test_every_service_method_sends_its_request(uds, guests):
    g = guests(uds)
    dm = DeviceManagerClient(UpcallChannel(uds, connect_timeout=1, request_timeout=1))
    dm.add_cpus([1, 2])
    dm.del_cpus([2], apic_ver=0x15)
    dm.add_memory(4 * GIB, 128 << 20)
    dm.remove_memory(4 * GIB, 128 << 20)
    dm.add_mmio(0xD000_0000, 0x1000, 5)
    dm.remove_mmio(0xD000_0000, 0x1000, 5)
    dm.close()
    T = wire.MsgType
    assert [wire.decode_request(r) for r in g.requests] == [
        wire.Request(T.ADD_CPU, wire.CpuRequest((1, 2))),
        wire.Request(T.DEL_CPU, wire.CpuRequest((2,), 0x15)),
        wire.Request(T.ADD_MEM, wire.MemRequest(4 * GIB, 128 << 20)),
        wire.Request(T.DEL_MEM, wire.MemRequest(4 * GIB, 128 << 20)),
        wire.Request(T.ADD_MMIO, wire.MmioRequest(0xD000_0000, 0x1000, 5)),
        wire.Request(T.DEL_MMIO, wire.MmioRequest(0xD000_0000, 0x1000, 5)),
    ]
    assert len(g.conns) == 1


@pytest.mark.parametrize("call", [
    lambda dm: dm.add_cpus([]),
    lambda dm: dm.add_cpus([256]),
    lambda dm: dm.add_cpus([3, 3]),
    lambda dm: dm.add_memory(4 * GIB, 0),
    lambda dm: dm.remove_memory(-1, 4096),
    lambda dm: dm.add_mmio(0xD000_0000, 0x1000, -1),
])
def test_bad_arguments_send_nothing(uds, guests, call):
    g = guests(uds)
    with pytest.raises(ValueError):
        call(DeviceManagerClient(UpcallChannel(uds, connect_timeout=1, request_timeout=1)))
    assert g.connect_lines == []


# -- refusals keep the connection -----------------------------------------------------------
def test_refusal_raises_errno_and_keeps_the_connection(uds, guests):
    answers = iter([lambda raw: ok(raw, -errno.EBUSY), ok])
    g = guests(uds, answer=lambda raw: next(answers)(raw))
    ch = UpcallChannel(uds, connect_timeout=1, request_timeout=1)
    with pytest.raises(UpcallRefused) as ei:
        ch.request(mem_req())
    assert ei.value.errno == errno.EBUSY
    assert ei.value.cpu_index is None
    assert ei.value.sent and ei.value.request == mem_req()
    msg = str(ei.value)
    assert "ADD_MEM(base=0x100000000, size=0x8000000)" in msg and "EBUSY" in msg and os.strerror(errno.EBUSY) in msg
    assert ch.request(mem_req()).ok
    assert len(g.conns) == 1 and len(g.requests) == 2
    ch.close()


def test_cpu_refusal_carries_the_failed_index(uds, guests):
    guests(uds, answer=lambda raw: ok(raw, -errno.EINVAL, cpu_index=2))
    dm = DeviceManagerClient(UpcallChannel(uds, connect_timeout=1, request_timeout=1))
    with pytest.raises(UpcallRefused) as ei:
        dm.add_cpus([1, 2, 3])
    assert (ei.value.errno, ei.value.cpu_index) == (errno.EINVAL, 2)
    assert "ADD_CPU(apic_ids=[1, 2, 3])" in str(ei.value) and "index 2" in str(ei.value)
    dm.close()


# -- timeouts and garbage drop the connection ------------------------------------------------
def test_timeout_drops_the_connection_and_the_next_request_reconnects(uds, guests):
    answers = iter([lambda raw: Act(hang=True), ok])
    g = guests(uds, answer=lambda raw: next(answers)(raw))
    ch = UpcallChannel(uds, connect_timeout=1, request_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(UpcallTimeout, match=r"ADD_MEM\(.*did not answer within 0.3s") as ei:
        ch.request(mem_req())
    assert 0.3 <= time.monotonic() - t0 < 1.0
    assert ei.value.sent  # the guest may have acted
    assert not ch.connected
    assert g.conns[0].client_eof.wait(1), "the timed-out connection was not closed"
    assert ch.request(mem_req()).ok
    assert len(g.conns) == 2
    ch.close()


GARBAGE = {
    "bad magic": (lambda raw: Act((0x444D0200).to_bytes(4, "little") + ok(raw).send[4:]),  # 'DM' v2.0
                  UpcallProtocolError, "bad magic"),
    "wrong msg_type": (lambda raw: Act(wire.encode_reply(wire.Reply(wire.MsgType.DEL_MEM, 0))),
                       UpcallProtocolError, "DEL_MEM to a ADD_MEM"),
    "positive ret": (lambda raw: Act(ok(raw).send[:16] + (5).to_bytes(4, "little") + ok(raw).send[20:]),
                     UpcallProtocolError, "positive status"),
    "short then EOF": (lambda raw: Act(ok(raw).send[:100], close=True), UpcallConnectionLost, "after 100 of 1024"),
    "EOF": (lambda raw: Act(close=True), UpcallConnectionLost, "after 0 of 1024"),
}


@pytest.mark.parametrize("case", GARBAGE, ids=list(GARBAGE))
def test_bad_replies_drop_the_connection(uds, guests, case):
    bad, exc_type, text = GARBAGE[case]
    answers = iter([bad, ok])
    g = guests(uds, answer=lambda raw: next(answers)(raw))
    ch = UpcallChannel(uds, connect_timeout=1, request_timeout=1)
    with pytest.raises(exc_type, match="ADD_MEM") as ei:
        ch.request(mem_req())
    assert text in str(ei.value)
    assert ei.value.sent
    if exc_type is UpcallProtocolError:
        assert isinstance(ei.value.__cause__, wire.UpcallProtocolError)
        assert g.conns[0].client_eof.wait(1), "the client kept a connection that sent garbage"
    assert not ch.connected
    assert ch.request(mem_req()).ok
    assert len(g.conns) == 2
    ch.close()


def test_idle_connection_closed_by_the_guest_is_replaced_before_sending(uds, guests):
    g = guests(uds, answer=lambda raw: Act(ok(raw).send, close=True))
    ch = UpcallChannel(uds, connect_timeout=1, request_timeout=1)
    ch.request(mem_req())
    time.sleep(0.05)  # the guest's close reaches us while idle
    ch.request(mem_req())  # no UpcallConnectionLost: the dead stream is noticed before the send
    assert len(g.conns) == 2 and [len(c.requests) for c in g.conns] == [1, 1]
    ch.close()


# -- connecting ------------------------------------------------------------------------------------
def test_connect_retries_until_the_guest_listens(uds, guests):
    g = guests(uds, refuse=5)
    ch = UpcallChannel(uds, connect_timeout=2, request_timeout=1)
    ch.connect()
    assert ch.connected
    assert len(g.connect_lines) == 6 and len(g.conns) == 1
    assert ch.request(mem_req()).ok
    ch.close()


def test_connect_gives_up_after_connect_timeout(uds, guests):
    g = guests(uds, refuse=float("inf"))
    ch = UpcallChannel(uds, connect_timeout=0.3, request_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(UpcallConnectError, match=r"ADD_MEM.*port 219.*nothing listened after 0.3s") as ei:
        ch.request(mem_req())
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.0
    tries = len(g.connect_lines)
    assert f"{tries} tries" in str(ei.value)
    assert not ei.value.sent and ei.value.request == mem_req()
    assert 5 <= tries <= 0.3 / 0.010 + 2  # retried, ~every 10 ms, not busy-spinning


def test_missing_vmm_socket_fails_at_once(uds):
    ch = UpcallChannel(uds, connect_timeout=2, request_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(UpcallConnectError, match="No such file"):
        ch.connect()
    assert time.monotonic() - t0 < 0.5


def test_rejected_connect_line_is_not_retried(uds, guests):
    g = guests(uds, handshake_reply=b"ERR no such port\n")
    with pytest.raises(UpcallConnectError, match="refused: b'ERR no such port'"):
        UpcallChannel(uds, connect_timeout=2, request_timeout=1).connect()
    assert len(g.connect_lines) == 1


BAD_GREETINGS = {
    "bad magic": wire.HEADER.pack(0x12345678, 0, 0, 0).ljust(MSG, b"\0"),
    "not CONNECT": wire.encode_reply(wire.Reply(wire.MsgType.ADD_MEM, 0)),
    "payload": wire.HEADER.pack(wire.MAGIC_VERSION, 4, 0, 0).ljust(MSG, b"\0"),
}


@pytest.mark.parametrize("name", BAD_GREETINGS, ids=list(BAD_GREETINGS))
def test_bad_greeting_is_a_protocol_error(uds, guests, name):
    g = guests(uds, greeting=BAD_GREETINGS[name])
    ch = UpcallChannel(uds, connect_timeout=2, request_timeout=1)
    with pytest.raises(UpcallProtocolError, match="bad CONNECT greeting") as ei:
        ch.connect()
    assert isinstance(ei.value.__cause__, wire.UpcallProtocolError)
    assert not ei.value.sent  # unlike a garbage reply: no request was written
    assert not ch.connected
    assert len(g.connect_lines) == 1
    assert g.conns[0].client_eof.wait(1)


def test_missing_greeting_times_out(uds, guests):
    guests(uds, greeting=None)
    ch = UpcallChannel(uds, connect_timeout=0.3, request_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(UpcallConnectError, match="no CONNECT greeting within 0.3s"):
        ch.connect()
    assert time.monotonic() - t0 < 1.0


# -- concurrency ---------------------------------------------------------------------------------
def test_one_request_in_flight_across_threads(uds, guests):
    g = guests(uds, answer=lambda raw: Act(ok(raw).send, delay=0.03))
    ch = UpcallChannel(uds, connect_timeout=1, request_timeout=2)
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(2):
                ch.request(mem_req(base=(4 + 2 * i + j) * GIB))
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not failures
    assert g.overlaps == 0, "a request arrived before the previous one was answered"
    assert len(g.conns) == 1
    assert sorted(wire.decode_request(r).payload.base // GIB for r in g.requests) == list(range(4, 12))
    ch.close()


def test_a_waiting_caller_gets_busy_after_its_timeout(uds, guests):
    g = guests(uds, answer=lambda raw: Act(ok(raw).send, delay=0.4))
    ch = UpcallChannel(uds, connect_timeout=1, request_timeout=2)
    ch.connect()
    first = threading.Thread(target=ch.request, args=(mem_req(),))
    first.start()
    time.sleep(0.05)
    with pytest.raises(UpcallBusy, match=r"DEL_MEM.*ADD_MEM.*still in flight after 0.1s") as ei:
        ch.request(wire.Request(wire.MsgType.DEL_MEM, wire.MemRequest(4 * GIB, 128 << 20)), timeout=0.1)
    assert not ei.value.sent
    first.join(2)
    assert [wire.decode_request(r).type for r in g.requests] == [wire.MsgType.ADD_MEM]
    ch.close()


def test_close_wakes_a_request_in_flight_and_is_final(uds, guests):
    guests(uds, answer=lambda raw: Act(hang=True))
    ch = UpcallChannel(uds, connect_timeout=1, request_timeout=5)
    errs: list[BaseException] = []

    def go() -> None:
        try:
            ch.request(mem_req())
        except BaseException as exc:  # noqa: BLE001
            errs.append(exc)

    t = threading.Thread(target=go)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    ch.close()
    t.join(2)
    assert time.monotonic() - t0 < 1.0
    assert len(errs) == 1 and isinstance(errs[0], UpcallClosed) and errs[0].sent
    assert not ch.connected
    with pytest.raises(UpcallClosed) as ei:
        ch.request(mem_req())
    assert not ei.value.sent


# -- no fd leaks ----------------------------------------------------------------------------------------
def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leak_across_failures(tmp_path, monkeypatch):
    created: list[socket.socket] = []

    class Tracked(socket.socket):  # keeps every socket alive, so a leak cannot hide behind GC
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            created.append(self)

    monkeypatch.setattr(socket, "socket", Tracked)
    before = _fds()
    scripts = iter([lambda raw: Act(hang=True),
                    lambda raw: Act(b"garbage".ljust(MSG, b"\0")),
                    lambda raw: ok(raw, -errno.EBUSY),
                    lambda raw: Act(ok(raw).send[:10], close=True),
                    ok])
    fakes = [FakeGuest(tmp_path / "a.sock", answer=lambda raw: next(scripts)(raw)),
             FakeGuest(tmp_path / "b.sock", refuse=float("inf")),
             FakeGuest(tmp_path / "c.sock", greeting=b"x" * MSG)]
    try:
        ch = UpcallChannel(tmp_path / "a.sock", connect_timeout=0.2, request_timeout=0.2)
        for _ in range(5):
            try:
                ch.request(mem_req())
            except UpcallError:
                pass
        ch.close()
        for path in ("b.sock", "c.sock", "missing.sock"):
            with pytest.raises(UpcallError):
                UpcallChannel(tmp_path / path, connect_timeout=0.1).connect()
    finally:
        for f in fakes:
            f.stop()
    assert len(fakes[0].conns) == 4  # timeout, garbage, (refusal kept it), short read each dropped one
    leaked = [s for s in created if s.fileno() != -1]
    assert not leaked, leaked
    assert _fds() == before
