"""The trio Client against a hand-built ttrpc peer, and against the real servers."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
import trio
from google.protobuf import empty_pb2, wrappers_pb2

from katapy.ttrpc.client import Client
from katapy.ttrpc.errors import (
    Code,
    DeadlineExceeded,
    Internal,
    NotFound,
    ResourceExhausted,
    TtrpcError,
    Unavailable,
    Unimplemented,
)

from . import wire
from .conftest import SERVICE, Harness

SVC = "katapy.test.Peer"


def with_peer(peer_fn: Callable[[wire.RawPeer], None], client_fn: Callable[[Client], Awaitable[None]]) -> None:
    """Run ``peer_fn`` on one end of a socketpair (thread) and ``client_fn`` on the other (trio)."""
    ours, theirs = socket.socketpair()
    errors: list[BaseException] = []

    def peer_main() -> None:
        try:
            peer_fn(wire.RawPeer(theirs))
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
        finally:
            theirs.close()

    thread = threading.Thread(target=peer_main, name="test-raw-peer")
    thread.start()

    async def main() -> None:
        async with Client(trio.SocketStream(trio.socket.from_stdlib_socket(ours))) as client:
            await client_fn(client)

    try:
        trio.run(main)
    finally:
        thread.join(10)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_concurrent_calls_odd_ids_and_out_of_order_answers() -> None:
    n = 10

    def peer(p: wire.RawPeer) -> None:
        requests = [p.recv_request() for _ in range(n)]
        assert sorted(r.stream_id for r in requests) == list(range(1, 2 * n, 2))
        for r in sorted(requests, key=lambda r: -r.stream_id):  # answer newest first
            text = wire.parse_fields(r.payload)[1][0].decode()
            p.send(wire.response_frame(r.stream_id, payload=wire.string_value(text.upper())))
        assert p.recv_request() is None  # client closes

    async def client(c: Client) -> None:
        results: dict[int, str] = {}

        async def one(i: int) -> None:
            reply = await c.call(SVC, "Upper", wrappers_pb2.StringValue(value=f"call {i}"), wrappers_pb2.StringValue)
            results[i] = reply.value

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        assert results == {i: f"CALL {i}" for i in range(n)}

    with_peer(peer, client)


def test_request_fields_timeout_and_metadata_on_the_wire() -> None:
    def peer(p: wire.RawPeer) -> None:
        r = p.recv_request()
        assert (r.stream_id, r.service, r.method) == (1, SVC, "Meta")
        assert r.payload == wire.string_value("x")
        assert 2_900_000_000 <= r.timeout_nano <= 3_000_000_000
        assert r.metadata == [("a", "1"), ("b", "2"), ("b", "3")]
        p.send(wire.response_frame(1))
        r = p.recv_request()
        assert (r.stream_id, r.timeout_nano, r.metadata) == (3, 0, [])
        p.send(wire.response_frame(3))

    async def client(c: Client) -> None:
        req = wrappers_pb2.StringValue(value="x")
        await c.call(SVC, "Meta", req, empty_pb2.Empty, timeout=3, metadata={"a": "1", "b": ["2", "3"]})
        await c.call(SVC, "Meta", req, empty_pb2.Empty)

    with_peer(peer, client)


def test_error_status_raises_matching_subclass() -> None:
    def peer(p: wire.RawPeer) -> None:
        for code, message in ((5, "no such container"), (12, "method Nope"), (99, "from the future")):
            r = p.recv_request()
            p.send(wire.response_frame(r.stream_id, code=code, message=message))

    async def client(c: Client) -> None:
        with pytest.raises(NotFound, match="no such container") as info:
            await c.call(SVC, "A", empty_pb2.Empty(), empty_pb2.Empty)
        assert info.value.code is Code.NOT_FOUND
        with pytest.raises(Unimplemented):
            await c.call(SVC, "B", empty_pb2.Empty(), empty_pb2.Empty)
        with pytest.raises(TtrpcError) as info2:
            await c.call(SVC, "C", empty_pb2.Empty(), empty_pb2.Empty)
        assert info2.value.code == 99 and info2.value.message == "from the future"

    with_peer(peer, client)


def test_connection_drop_fails_pending_and_later_calls_with_unavailable() -> None:
    def peer(p: wire.RawPeer) -> None:
        for _ in range(3):
            p.recv_request()
        p.sock.shutdown(socket.SHUT_RDWR)

    async def client(c: Client) -> None:
        failures: list[BaseException] = []

        async def one() -> None:
            try:
                await c.call(SVC, "Wait", empty_pb2.Empty(), empty_pb2.Empty)
            except TtrpcError as exc:
                failures.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
        assert len(failures) == 3 and all(isinstance(f, Unavailable) for f in failures)
        assert c.closed
        with pytest.raises(Unavailable):
            await c.call(SVC, "Again", empty_pb2.Empty(), empty_pb2.Empty)

    with_peer(peer, client)


def test_timeout_raises_deadline_exceeded_and_late_answer_is_dropped() -> None:
    def peer(p: wire.RawPeer) -> None:
        late = p.recv_request()
        time.sleep(0.3)
        p.send(wire.response_frame(late.stream_id, payload=wire.string_value("too late")))
        r = p.recv_request()
        p.send(wire.response_frame(r.stream_id, payload=wire.string_value("on time")))

    async def client(c: Client) -> None:
        started = trio.current_time()
        with pytest.raises(DeadlineExceeded):
            await c.call(SVC, "Slow", empty_pb2.Empty(), wrappers_pb2.StringValue, timeout=0.1)
        assert trio.current_time() - started < 1
        await trio.sleep(0.4)  # the late answer arrives and must be dropped
        reply = await c.call(SVC, "Fast", empty_pb2.Empty(), wrappers_pb2.StringValue)
        assert reply.value == "on time"

    with_peer(peer, client)


def test_malformed_responses() -> None:
    def peer(p: wire.RawPeer) -> None:
        r = p.recv_request()
        p.send(wire.raw_frame(r.stream_id, wire.RESPONSE, b"\x0a\x7f"))  # broken Response
        r = p.recv_request()
        p.send(wire.response_frame(r.stream_id, payload=b"\x0a\x7f"))  # broken payload
        r = p.recv_request()
        p.send(wire.raw_frame(r.stream_id + 100, wire.RESPONSE, b""))  # nobody waits for it
        p.send(wire.raw_frame(r.stream_id, 0x42, b"unknown type"))
        p.send(wire.response_frame(r.stream_id, payload=wire.string_value("good")))
        r = p.recv_request()
        p.send(b"\xffgarbage that is no ttrpc header")
        p.recv_request()

    async def client(c: Client) -> None:
        with pytest.raises(Internal):
            await c.call(SVC, "A", empty_pb2.Empty(), wrappers_pb2.StringValue)
        with pytest.raises(Internal):
            await c.call(SVC, "B", empty_pb2.Empty(), wrappers_pb2.StringValue)
        assert (await c.call(SVC, "C", empty_pb2.Empty(), wrappers_pb2.StringValue)).value == "good"
        with trio.fail_after(5), pytest.raises(Unavailable):
            await c.call(SVC, "D", empty_pb2.Empty(), wrappers_pb2.StringValue)

    with_peer(peer, client)


def test_oversize_request_refused_locally() -> None:
    def peer(p: wire.RawPeer) -> None:
        r = p.recv_request()
        assert r.method == "Small"
        p.send(wire.response_frame(r.stream_id))

    async def client(c: Client) -> None:
        big = wrappers_pb2.BytesValue(value=b"\0" * (wire.MAX_DATA + 1))
        with pytest.raises(ResourceExhausted):
            await c.call(SVC, "Big", big, empty_pb2.Empty)
        await c.call(SVC, "Small", empty_pb2.Empty(), empty_pb2.Empty)

    with_peer(peer, client)


def test_connect_unix_nobody_listening(tmp_path) -> None:
    async def main() -> None:
        with pytest.raises(Unavailable):
            await Client.connect_unix(tmp_path / "absent.sock")

    trio.run(main)


def test_client_against_both_servers(server: Harness) -> None:
    async def main() -> None:
        async with await Client.connect_unix(server.path) as c:
            reply = await c.call(SERVICE, "Echo", wrappers_pb2.StringValue(value="e2e"), wrappers_pb2.StringValue)
            assert reply.value == "e2e"
            with pytest.raises(NotFound, match="gone"):
                await c.call(SERVICE, "Fail", wrappers_pb2.StringValue(value="gone"), empty_pb2.Empty)
            with pytest.raises(DeadlineExceeded):
                await c.call(SERVICE, "Hang", empty_pb2.Empty(), empty_pb2.Empty, timeout=0.2)
            with pytest.raises(Unimplemented):
                await c.call("x.Y", "Z", empty_pb2.Empty(), empty_pb2.Empty)
            with pytest.raises(Internal, match="unmarshalling payload"):  # bad UTF-8 in a string field
                await c.call(SERVICE, "Echo", wrappers_pb2.BytesValue(value=b"\xff\xfe"), wrappers_pb2.StringValue)
            results: list[int] = []

            async def sleeper(ms: int) -> None:
                r = await c.call(SERVICE, "Sleep", wrappers_pb2.UInt32Value(value=ms), wrappers_pb2.UInt32Value)
                results.append(r.value)

            async with trio.open_nursery() as nursery:
                for ms in (300, 200, 100, 0):
                    nursery.start_soon(sleeper, ms)
            assert results == [0, 100, 200, 300]

    trio.run(main)
