"""Interop with Go ttrpc: a private containerd 1.6 serves the Events service on its ttrpc socket.

containerd's ttrpc listener (``[ttrpc] address``) serves
``containerd.services.events.ttrpc.v1.Events/Forward`` for shims.  Our trio
Client and the hand-built peer talk to it, which checks katapy's idea of the wire
(and the answers our own servers give) against the real Go implementation.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from google.protobuf import empty_pb2

from katapy.ttrpc.client import Client
from katapy.ttrpc.errors import Code, InvalidArgument, TtrpcError, Unimplemented

from . import wire

pytestmark = pytest.mark.containerd

EVENTS = "containerd.services.events.ttrpc.v1.Events"


def forward_request(namespace: str, topic: str) -> bytes:
    """ForwardRequest{envelope=1 Envelope{timestamp=1, namespace=2, topic=3, event=4 Any}}, by hand."""
    timestamp = wire.field_varint(1, int(time.time()))
    event = wire.field_bytes(1, "type.googleapis.com/google.protobuf.Empty")
    envelope = (
        wire.field_bytes(1, timestamp)
        + wire.field_bytes(2, namespace)
        + wire.field_bytes(3, topic)
        + wire.field_bytes(4, event)
    )
    return wire.field_bytes(1, envelope)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    binary = shutil.which("containerd")
    if binary is None:
        pytest.skip("containerd is not installed: no Go ttrpc peer to test against")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root to start")
    base = Path("/tmp") / f"katapy-ttrpc-{os.getpid()}"  # unix socket paths must stay short
    base.mkdir()
    ttrpc_sock = base / "c.sock.ttrpc"
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base}/root"\nstate = "{base}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{base}/c.sock"\n'
        f'[ttrpc]\n  address = "{ttrpc_sock}"\n'
    )
    log = open(base / "containerd.log", "wb")
    proc = subprocess.Popen([binary, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not ttrpc_sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("containerd did not start: " + (base / "containerd.log").read_text()[-2000:])
            time.sleep(0.05)
        yield ttrpc_sock
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def run_client(path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await Client.connect_unix(path) as client:
            await fn(client)

    trio.run(main)


def test_client_calls_go_server(containerd: Path) -> None:
    async def fn(c: Client) -> None:
        ok = _Raw(forward_request("default", "/katapy/ttrpc-test"))
        reply = await c.call(EVENTS, "Forward", ok, empty_pb2.Empty, timeout=5, metadata={"k": ["a", "b"]})
        assert isinstance(reply, empty_pb2.Empty)

        results = []

        async def one(i: int) -> None:
            await c.call(EVENTS, "Forward", _Raw(forward_request("default", f"/katapy/{i}")), empty_pb2.Empty)
            results.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
        assert sorted(results) == list(range(50))

        with pytest.raises(Unimplemented):
            await c.call(EVENTS, "NoSuchMethod", empty_pb2.Empty(), empty_pb2.Empty)
        with pytest.raises(Unimplemented):
            await c.call("no.such.Service", "Forward", empty_pb2.Empty(), empty_pb2.Empty)
        with pytest.raises(TtrpcError) as info:
            await c.call(EVENTS, "Forward", _Raw(forward_request("bad namespace!", "/x")), empty_pb2.Empty)
        assert info.value.code == Code.INVALID_ARGUMENT
        assert isinstance(info.value, InvalidArgument)

    run_client(containerd, fn)


def test_go_server_answers_match_ours(containerd: Path) -> None:
    """The answers our servers give to bad input, as the Go server gives them."""
    p = wire.RawPeer.connect(str(containerd))
    try:
        r = p.call(2, EVENTS, "Forward", forward_request("default", "/x"))
        assert (r.stream_id, r.code, r.payload) == (2, Code.INVALID_ARGUMENT, b"")
        assert "odd" in r.message
        r = p.call(1, EVENTS, "Forward", b"\x0a\x64ab")
        assert (r.code, r.payload) == (Code.INTERNAL, b"")
        assert "unmarshal" in r.message
        r = p.call(3, "no.such.Service", "X")
        assert (r.code, r.message) == (Code.UNIMPLEMENTED, "service no.such.Service")
        r = p.call(5, EVENTS, "Nope")
        assert (r.code, r.message) == (Code.UNIMPLEMENTED, "method Nope")
        p.send(wire.raw_frame(7, 0x7F, b"unknown type"))
        r = p.call(9, EVENTS, "Forward", forward_request("default", "/ok"))
        assert (r.stream_id, r.code) == (9, Code.OK)
        length = wire.MAX_DATA + 1
        p.send(wire.header(length, 11, wire.REQUEST) + bytes(length))
        r = p.recv_response()
        assert (r.stream_id, r.code, r.payload) == (11, Code.RESOURCE_EXHAUSTED, b"")
        r = p.call(13, EVENTS, "Forward", forward_request("default", "/after-oversize"))
        assert (r.stream_id, r.code) == (13, Code.OK)
    finally:
        p.close()


class _Raw:
    """A request 'message' whose serialized form is given bytes (for hand-built payloads)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name
        return self._data
