"""Both ttrpc servers against a hand-built peer over a real unix socket."""
from __future__ import annotations

import json
import os
import random
import socket
import threading
import time

import pytest

from . import wire
from .conftest import SERVICE, Harness, _start_sync, _start_trio

OK, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 2, 3, 4, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 8, 12, 13


def peer(h: Harness) -> wire.RawPeer:
    return wire.RawPeer.connect(h.path)


def test_round_trip(server: Harness) -> None:
    p = peer(server)
    try:
        r = p.call(1, SERVICE, "Echo", wire.string_value("hello ttrpc"))
        assert (r.stream_id, r.code, r.text) == (1, OK, "hello ttrpc")
        r = p.call(3, SERVICE, "Echo", wire.string_value("again"))
        assert (r.stream_id, r.code, r.text) == (3, OK, "again")
    finally:
        p.close()


def test_hundred_parallel_calls_answer_out_of_order(server: Harness) -> None:
    rng = random.Random(7)
    delays = {2 * i + 1: rng.randrange(0, 300) for i in range(100)}
    p = peer(server)
    try:
        p.send(b"".join(wire.request_frame(sid, SERVICE, "Sleep", wire.uint_value(ms)) for sid, ms in delays.items()))
        started = time.monotonic()
        answers = [p.recv_response() for _ in delays]
        elapsed = time.monotonic() - started
    finally:
        p.close()
    assert sorted(a.stream_id for a in answers) == sorted(delays)
    assert all(a.code == OK and a.number == delays[a.stream_id] for a in answers)
    order = [a.stream_id for a in answers]
    assert order != sorted(order), "responses came back strictly in request order"
    # Concurrency: 100 calls sleeping up to 0.3 s each finish far below their 15 s sum.
    assert elapsed < 5, elapsed


def test_deadline_cancels_handler_and_answers_deadline_exceeded(server: Harness) -> None:
    p = peer(server)
    try:
        started = time.monotonic()
        r = p.call(1, SERVICE, "Hang", timeout_nano=200_000_000)
        assert (r.stream_id, r.code, r.payload) == (1, DEADLINE_EXCEEDED, b"")
        assert 0.15 < time.monotonic() - started < 3
        assert server.hang_cancelled.wait(5), "handler was not told about its deadline"
        # The connection carries on and the deadline is visible to handlers.
        r = p.call(3, SERVICE, "Timeout", timeout_nano=2_500_000_000)
        assert (r.code, r.text) == (OK, "2.5")
        r = p.call(5, SERVICE, "Timeout")
        assert (r.code, r.text) == (OK, "None")
    finally:
        p.close()


def test_fast_handler_beats_its_deadline(server: Harness) -> None:
    p = peer(server)
    try:
        r = p.call(1, SERVICE, "Sleep", wire.uint_value(10), timeout_nano=2_000_000_000)
        assert (r.code, r.number) == (OK, 10)
        # Nothing more arrives for stream 1 after the deadline would have passed.
        r = p.call(3, SERVICE, "Sleep", wire.uint_value(50), timeout_nano=10_000_000)
        assert (r.stream_id, r.code) == (3, DEADLINE_EXCEEDED)
        time.sleep(0.1)
        r = p.call(5, SERVICE, "Echo", wire.string_value("after"))
        assert (r.stream_id, r.text) == (5, "after"), "a late handler result leaked onto the wire"
    finally:
        p.close()


def test_metadata_delivered_with_repeated_keys(server: Harness) -> None:
    p = peer(server)
    try:
        md = [("k8s-ns", "default"), ("trace", "a"), ("trace", "b")]
        r = p.call(1, SERVICE, "Metadata", metadata=md)
        assert r.code == OK
        assert json.loads(r.text) == {"k8s-ns": ["default"], "trace": ["a", "b"]}
    finally:
        p.close()


def test_unknown_service_and_method(server: Harness) -> None:
    p = peer(server)
    try:
        r = p.call(1, "no.such.Service", "Echo", wire.string_value("x"))
        assert (r.code, r.message, r.payload) == (UNIMPLEMENTED, "service no.such.Service", b"")
        r = p.call(3, SERVICE, "NoSuchMethod")
        assert (r.code, r.message, r.payload) == (UNIMPLEMENTED, "method NoSuchMethod", b"")
    finally:
        p.close()


def test_bad_payload_is_internal(server: Harness) -> None:
    p = peer(server)
    try:
        # Field 1 announced as 100 bytes long, only 2 present.
        r = p.call(1, SERVICE, "Echo", b"\x0a\x64ab")
        assert (r.code, r.message, r.payload) == (INTERNAL, "ttrpc: error unmarshalling payload", b"")
    finally:
        p.close()


def test_bad_request_envelope_is_invalid_argument(server: Harness) -> None:
    p = peer(server)
    try:
        p.send(wire.raw_frame(1, wire.REQUEST, b"\x0a\xff\xff\xff\xff\x0f"))
        r = p.recv_response()
        assert (r.stream_id, r.code, r.payload) == (1, INVALID_ARGUMENT, b"")
        assert p.call(3, SERVICE, "Echo", wire.string_value("ok")).text == "ok"
    finally:
        p.close()


def test_even_stream_id_rejected_on_that_id(server: Harness) -> None:
    p = peer(server)
    try:
        for sid in (2, 0):
            r = p.call(sid, SERVICE, "Echo", wire.string_value("x"))
            assert (r.stream_id, r.code, r.payload) == (sid, INVALID_ARGUMENT, b"")
            assert "odd" in r.message
    finally:
        p.close()


def test_stream_id_in_use_rejected(server: Harness) -> None:
    p = peer(server)
    try:
        p.send(wire.request_frame(1, SERVICE, "Sleep", wire.uint_value(300)))
        p.send(wire.request_frame(1, SERVICE, "Echo", wire.string_value("dup")))
        first = p.recv_response()
        assert (first.stream_id, first.code) == (1, INVALID_ARGUMENT)
        second = p.recv_response()
        assert (second.stream_id, second.code, second.number) == (1, OK, 300)
    finally:
        p.close()


def test_handler_errors_map_to_status(server: Harness) -> None:
    p = peer(server)
    try:
        r = p.call(1, SERVICE, "Fail", wire.string_value("container abc"))
        assert (r.code, r.message, r.payload) == (NOT_FOUND, "container abc", b"")
        r = p.call(3, SERVICE, "Crash")
        assert (r.code, r.payload) == (UNKNOWN, b"")
        assert "boom" in r.message
    finally:
        p.close()


def test_oversize_request_discarded_with_resource_exhausted(server: Harness) -> None:
    p = peer(server)
    try:
        length = wire.MAX_DATA + 1
        p.send(wire.header(length, 7, wire.REQUEST) + b"\x00" * length)
        p.send(wire.request_frame(9, SERVICE, "Echo", wire.string_value("still here")))
        r = p.recv_response()
        assert (r.stream_id, r.code, r.payload) == (7, RESOURCE_EXHAUSTED, b"")
        r = p.recv_response()
        assert (r.stream_id, r.code, r.text) == (9, OK, "still here")
    finally:
        p.close()


def test_oversize_response_becomes_resource_exhausted(server: Harness) -> None:
    p = peer(server)
    try:
        r = p.call(1, SERVICE, "Big", wire.uint_value(wire.MAX_DATA + 16))
        assert (r.code, r.payload) == (RESOURCE_EXHAUSTED, b"")
        assert p.call(3, SERVICE, "Big", wire.uint_value(1000)).text == "x" * 1000
    finally:
        p.close()


def test_unknown_frame_types_and_stray_responses_ignored(server: Harness) -> None:
    p = peer(server)
    try:
        p.send(wire.raw_frame(1, 0x7F, b"future"))
        p.send(wire.raw_frame(3, wire.RESPONSE, b"not for you"))
        p.send(wire.raw_frame(5, 3, b"data", flags=1))
        r = p.call(7, SERVICE, "Echo", wire.string_value("first answer"))
        assert (r.stream_id, r.text) == (7, "first answer")
    finally:
        p.close()


def test_truncated_frame_then_close(server: Harness) -> None:
    p = peer(server)
    p.send(wire.request_frame(1, SERVICE, "Echo", wire.string_value("cut"))[:-3])
    p.sock.shutdown(socket.SHUT_WR)  # the server sees EOF mid-frame
    p.expect_eof()
    p.close()
    q = peer(server)
    try:
        assert q.call(1, SERVICE, "Echo", wire.string_value("fine")).text == "fine"
    finally:
        q.close()


def test_garbage_closes_only_that_connection(server: Harness) -> None:
    good = peer(server)
    bad = peer(server)
    try:
        assert good.call(1, SERVICE, "Echo", wire.string_value("before")).text == "before"
        bad.send(b"GET / HTTP/1.1\r\nHost: katapy\r\n\r\n" * 4)
        bad.expect_eof()
        assert good.call(3, SERVICE, "Echo", wire.string_value("after")).text == "after"
    finally:
        good.close()
        bad.close()


def test_flood_of_malformed_frames_then_good_call(server: Harness) -> None:
    rng = random.Random(1234)
    p = peer(server)
    expected_errors = set()
    try:
        flood = []
        sid = 1
        for _ in range(300):
            kind = rng.randrange(6)
            if kind == 0:  # even id
                flood.append(wire.request_frame(sid + 1, SERVICE, "Echo"))
                expected_errors.add((sid + 1, INVALID_ARGUMENT))
            elif kind == 1:  # undecodable envelope
                flood.append(wire.raw_frame(sid, wire.REQUEST, b"\x0b" + rng.randbytes(rng.randrange(1, 40))))
                expected_errors.add((sid, None))
            elif kind == 2:  # bad payload
                flood.append(wire.request_frame(sid, SERVICE, "Echo", b"\x0a\x7f"))
                expected_errors.add((sid, INTERNAL))
            elif kind == 3:  # unknown method
                flood.append(wire.request_frame(sid, SERVICE, rng.randbytes(8).hex()))
                expected_errors.add((sid, UNIMPLEMENTED))
            elif kind == 4:  # unknown frame type: no answer
                flood.append(wire.raw_frame(sid, rng.randrange(4, 256), rng.randbytes(rng.randrange(0, 64))))
            else:  # random flags and junk on a data frame: no answer
                flood.append(wire.raw_frame(sid, 3, rng.randbytes(16), flags=rng.randrange(256)))
            sid += 2
        p.send(b"".join(flood))
        p.send(wire.request_frame(sid, SERVICE, "Echo", wire.string_value("survived")))
        got = {}
        while True:
            r = p.recv_response()
            if r.stream_id == sid:
                break
            assert r.payload == b""
            got[r.stream_id] = r.code
        assert (r.code, r.text) == (OK, "survived")
        # The envelope junk may or may not decode as some Request; every other error is exact.
        exact = {s: c for s, c in expected_errors if c is not None}
        assert {s: got.get(s) for s in exact} == exact
    finally:
        p.close()


def test_many_garbage_connections_do_not_hurt_the_server(server: Harness) -> None:
    rng = random.Random(99)
    for _ in range(20):
        bad = peer(server)
        try:
            bad.send(rng.randbytes(rng.randrange(1, 2000)))
        except OSError:
            pass
        bad.close()
    p = peer(server)
    try:
        assert p.call(1, SERVICE, "Echo", wire.string_value("alive")).text == "alive"
    finally:
        p.close()


def test_peer_vanishing_with_calls_in_flight(server: Harness) -> None:
    p = peer(server)
    p.send(wire.request_frame(1, SERVICE, "Hang"))
    p.send(wire.request_frame(3, SERVICE, "Sleep", wire.uint_value(100)))
    time.sleep(0.05)
    p.close()
    assert server.hang_cancelled.wait(5), "handler of a closed connection kept running"
    q = peer(server)
    try:
        assert q.call(1, SERVICE, "Echo", wire.string_value("next")).text == "next"
    finally:
        q.close()


@pytest.mark.parametrize("kind", ["trio", "sync"])
def test_no_fds_or_threads_leak(kind: str, tmp_path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def live_threads() -> set[str]:
        # trio keeps idle worker threads (used for bind()) cached for a while: not ours.
        return {t.name for t in threading.enumerate() if not t.name.startswith("Trio thread")}

    threads_before = live_threads()
    fds_before = open_fds()
    h = Harness(kind, str(tmp_path / "leak.sock"))
    (_start_trio if kind == "trio" else _start_sync)(h)
    try:
        for i in range(10):
            p = peer(h)
            p.send(wire.request_frame(1, SERVICE, "Hang"))
            assert p.call(3, SERVICE, "Echo", wire.string_value(str(i))).text == str(i)
            if i % 2:
                p.send(b"\xfe" * 20)
            p.close()
        p = peer(h)  # still connected while the server stops
        p.send(wire.request_frame(1, SERVICE, "Hang"))
    finally:
        h.stop()  # type: ignore[operator]
    p.expect_eof()
    p.close()
    deadline = time.monotonic() + 5
    while (open_fds(), live_threads()) != (fds_before, threads_before):
        assert time.monotonic() < deadline, (open_fds(), fds_before, live_threads(), threads_before)
        time.sleep(0.02)
