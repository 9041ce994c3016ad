"""trio ttrpc server (containerd/ttrpc ``server.go`` semantics, unary calls).

One task reads a connection and decodes frames; every request runs in its own
task, so responses leave in completion order (a blocking ``Wait`` does not hold
up other calls).  Responses are written under a lock so frames never interleave.

Error behaviour (see :mod:`katapy.ttrpc.dispatch` for the per-request rules):

* oversize frame (4 MiB < length < 16 MiB): its body is discarded and the
  stream gets RESOURCE_EXHAUSTED;
* a frame whose reserved header byte is set (garbage, not ttrpc): the
  connection is closed; other connections are unaffected;
* a truncated frame followed by EOF: the connection is closed;
* unknown frame types (and stray responses/data): ignored;
* ``timeout_nano``: the handler is cancelled at the deadline and the stream
  gets DEADLINE_EXCEEDED.

When a connection ends, the handlers still running for it are cancelled.
Nothing a peer sends can make :meth:`Server.serve_stream` or
:meth:`Server.serve_unix` raise.
"""
from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from typing import Any

import trio

from katapy import log
from katapy.ttrpc import frame
from katapy.ttrpc.dispatch import (
    Call,
    Method,
    Registry,
    error_response,
    outcome_response,
    oversize_response,
    prepare,
)
from katapy.ttrpc.errors import Code, TtrpcError

RECEIVE_SIZE = 64 * 1024
_DEADLINE_MESSAGE = "context deadline exceeded"


class Server:
    """Serves registered services on any number of trio streams."""

    def __init__(self) -> None:
        self._registry = Registry()
        self._log = log.get("ttrpc.server")

    def register(self, service: str, methods: Mapping[str, Method]) -> None:
        """Register ``{method: (RequestCls, async handler(request, ctx) -> response)}``."""
        self._registry.register(service, methods)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until the peer closes it (or sends garbage); closes ``stream``."""
        try:
            await _Connection(self._registry, stream, self._log).run()
        except Exception as exc:  # the server never dies because of one connection
            self._log.error("ttrpc connection failed", error=repr(exc))
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def serve_unix(
        self,
        listener: str | os.PathLike[str] | socket.socket | trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections forever on a unix socket path or a listening socket.

        A path is bound here (and unlinked on exit); a socket object must already
        be bound and listening (for example fd 3 handed over by containerd), of
        any family.  ``task_status.started`` receives the socket's address.
        """
        created: str | None = None
        if isinstance(listener, (str, os.PathLike)):
            created = os.fspath(listener)
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.bind(created)
                sock.listen(128)
            except BaseException:
                sock.close()
                raise
        elif isinstance(listener, socket.socket):
            sock = trio.socket.from_stdlib_socket(listener)
        else:
            sock = listener
        accepting = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(str(sock.getsockname()))
                while True:
                    try:
                        stream = await accepting.accept()
                    except OSError as exc:
                        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            raise
                        self._log.warning("ttrpc accept failed; retrying", error=repr(exc))
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self.serve_stream, stream)
        finally:
            with trio.CancelScope(shield=True):
                await accepting.aclose()
            if created is not None:
                try:
                    os.unlink(created)
                except FileNotFoundError:
                    pass


class _Connection:
    """State of one served connection."""

    def __init__(self, registry: Registry, stream: trio.abc.Stream, logger: Any):
        self._registry = registry
        self._stream = stream
        self._log = logger
        self._send_lock = trio.Lock()
        self._active: set[int] = set()
        self._broken = False

    async def run(self) -> None:
        decoder = frame.FrameDecoder()
        async with trio.open_nursery() as nursery:
            try:
                while not self._broken:
                    try:
                        data = await self._stream.receive_some(RECEIVE_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if not data:
                        if not decoder.at_boundary:
                            self._log.info("ttrpc peer closed mid-frame", buffered=decoder.buffered)
                        break
                    try:
                        events = decoder.feed(data)
                    except frame.FrameError as exc:
                        await self._handle_all(exc.events, nursery)
                        self._log.warning("ttrpc closing connection", reason=str(exc))
                        break
                    await self._handle_all(events, nursery)
            finally:
                nursery.cancel_scope.cancel()

    async def _handle_all(self, events: list[frame.Event], nursery: trio.Nursery) -> None:
        for event in events:
            if isinstance(event, frame.OversizeFrame):
                self._log.warning("ttrpc oversize frame discarded", stream_id=event.stream_id, length=event.length)
                await self._send(oversize_response(event))
                continue
            prepared = prepare(self._registry, event, self._active.__contains__)
            if prepared is None:
                self._log.debug("ttrpc frame ignored", stream_id=event.stream_id, type=event.type)
            elif isinstance(prepared, Call):
                self._active.add(prepared.stream_id)
                nursery.start_soon(self._run_call, prepared)
            else:
                await self._send(prepared)

    async def _run_call(self, call: Call) -> None:
        ctx = call.context
        try:
            if ctx.timeout is not None:
                ctx.deadline = trio.current_time() + ctx.timeout
            result: object = None
            error: BaseException | None = None
            with trio.CancelScope(deadline=ctx.deadline if ctx.deadline is not None else float("inf")) as scope:
                try:
                    result = await call.handler(call.request, ctx)
                except Exception as exc:
                    error = exc
            if scope.cancelled_caught:
                reply = error_response(call.stream_id, Code.DEADLINE_EXCEEDED, _DEADLINE_MESSAGE)
            else:
                if error is not None and not isinstance(error, TtrpcError):
                    self._log.warning(
                        "ttrpc handler raised", service=ctx.service, method=ctx.method, error=repr(error)
                    )
                reply = outcome_response(call.stream_id, result, error)
        finally:
            self._active.discard(call.stream_id)
        await self._send(reply)

    async def _send(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            async with self._send_lock:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._log.info("ttrpc peer gone while answering", error=repr(exc))
            self._broken = True
