"""Both ttrpc servers (trio and threaded) serving one probe service on a real unix socket."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from google.protobuf import empty_pb2, wrappers_pb2

from katapy.ttrpc.errors import NotFound
from katapy.ttrpc.server import Server
from katapy.ttrpc.sync_server import SyncServer

SERVICE = "katapy.test.Probe"


@dataclass
class Harness:
    kind: str
    path: str
    hang_cancelled: threading.Event = field(default_factory=threading.Event)
    stop: object = None


def _big(n: int) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value="x" * n)


def trio_methods(h: Harness) -> dict:
    async def echo(req, ctx):
        return wrappers_pb2.StringValue(value=req.value)

    async def sleep(req, ctx):
        await trio.sleep(req.value / 1000)
        return wrappers_pb2.UInt32Value(value=req.value)

    async def metadata(req, ctx):
        return wrappers_pb2.StringValue(value=json.dumps(ctx.metadata))

    async def timeout(req, ctx):
        return wrappers_pb2.StringValue(value=repr(ctx.timeout))

    async def hang(req, ctx):
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            h.hang_cancelled.set()
            raise
        return empty_pb2.Empty()

    async def fail(req, ctx):
        raise NotFound(req.value)

    async def crash(req, ctx):
        raise RuntimeError("boom")

    async def big(req, ctx):
        return _big(req.value)

    return _table(echo, sleep, metadata, timeout, hang, fail, crash, big)


def sync_methods(h: Harness) -> dict:
    def echo(req, ctx):
        return wrappers_pb2.StringValue(value=req.value)

    def sleep(req, ctx):
        time.sleep(req.value / 1000)
        return wrappers_pb2.UInt32Value(value=req.value)

    def metadata(req, ctx):
        return wrappers_pb2.StringValue(value=json.dumps(ctx.metadata))

    def timeout(req, ctx):
        return wrappers_pb2.StringValue(value=repr(ctx.timeout))

    def hang(req, ctx):
        if ctx.cancelled.wait(30):
            h.hang_cancelled.set()
        return empty_pb2.Empty()

    def fail(req, ctx):
        raise NotFound(req.value)

    def crash(req, ctx):
        raise RuntimeError("boom")

    def big(req, ctx):
        return _big(req.value)

    return _table(echo, sleep, metadata, timeout, hang, fail, crash, big)


def _table(echo, sleep, metadata, timeout, hang, fail, crash, big) -> dict:
    return {
        "Echo": (wrappers_pb2.StringValue, echo),
        "Sleep": (wrappers_pb2.UInt32Value, sleep),
        "Metadata": (empty_pb2.Empty, metadata),
        "Timeout": (empty_pb2.Empty, timeout),
        "Hang": (empty_pb2.Empty, hang),
        "Fail": (wrappers_pb2.StringValue, fail),
        "Crash": (empty_pb2.Empty, crash),
        "Big": (wrappers_pb2.UInt32Value, big),
    }


def _start_trio(h: Harness) -> None:
    server = Server()
    server.register(SERVICE, trio_methods(h))
    ready = threading.Event()
    box: dict = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            box["scope"] = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_unix, h.path)
                ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), name="test-trio-server")
    thread.start()
    assert ready.wait(10), "trio server did not start"

    def stop() -> None:
        trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
        thread.join(10)
        assert not thread.is_alive()
        assert not Path(h.path).exists(), "serve_unix left its socket behind"

    h.stop = stop


def _start_sync(h: Harness) -> None:
    server = SyncServer()
    server.register(SERVICE, sync_methods(h))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(h.path)
    listener.listen(16)
    thread = server.start(listener)

    def stop() -> None:
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive()
        listener.close()
        server.close()
        deadline = time.monotonic() + 10
        while any(t.name.startswith("ttrpc-") for t in threading.enumerate()):
            assert time.monotonic() < deadline, "threaded server left threads running"
            time.sleep(0.01)

    h.stop = stop


@pytest.fixture(params=["trio", "sync"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(request.param, str(tmp_path / "ttrpc.sock"))
    (_start_trio if h.kind == "trio" else _start_sync)(h)
    try:
        yield h
    finally:
        h.stop()  # type: ignore[operator]
