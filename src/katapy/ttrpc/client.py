"""trio ttrpc client (containerd/ttrpc ``client.go`` semantics, unary calls).

Calls use odd stream ids 1, 3, 5, ... on one connection and may run
concurrently.  A sender task writes request frames in order (so a cancelled
call can never leave half a frame on the wire) and a reader task hands each
response to the call waiting on its stream id; responses may arrive in any
order.  When the connection closes or breaks, every pending call and every
later call fails with :class:`~katapy.ttrpc.errors.Unavailable`.

Usage::

    async with await Client.connect_unix(path) as client:
        resp = await client.call("grpc.health.v1.Health", "Check", req, CheckResponse, timeout=5)
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from types import TracebackType

import trio
from google.protobuf.message import Message

from katapy import log
from katapy.pb import ttrpc_pb2
from katapy.ttrpc import frame
from katapy.ttrpc.errors import (
    Code,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    TtrpcError,
    Unavailable,
)

RECEIVE_SIZE = 64 * 1024


class _Pending:
    """One call waiting for its response frame."""

    __slots__ = ("done", "response", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: ttrpc_pb2.Response | None = None
        self.error: TtrpcError | None = None

    def finish(self, response: ttrpc_pb2.Response | None = None, error: TtrpcError | None = None) -> None:
        if not self.done.is_set():
            self.response, self.error = response, error
            self.done.set()


class Client:
    """A ttrpc connection; use it as ``async with client:`` (runs its reader/sender tasks)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._log = log.get("ttrpc.client")
        self._next_stream_id = 1
        self._pending: dict[int, _Pending] = {}
        self._outgoing_send, self._outgoing_receive = trio.open_memory_channel[bytes](math.inf)
        self._closed: TtrpcError | None = None
        self._started = False
        self._tasks = trio.CancelScope()
        self._exit_stack: AsyncExitStack | None = None

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str]) -> Client:
        """Dial a unix socket; raises :class:`Unavailable` when nobody listens."""
        try:
            stream = await trio.open_unix_socket(os.fspath(path))
        except OSError as exc:
            raise Unavailable(f"ttrpc: dial {os.fspath(path)}: {exc.strerror or exc}") from exc
        return cls(stream)

    async def __aenter__(self) -> Client:
        if self._started:
            raise RuntimeError("ttrpc Client already started")
        self._started = True
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        self._exit_stack = stack
        nursery.start_soon(self._run_tasks)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.aclose()
        assert self._exit_stack is not None
        # Our tasks are cancelled by now, so the nursery exits at once.  The
        # body's own exception is not handed to it: trio would wrap it in an
        # ExceptionGroup, and callers should see exactly what they raised.
        await self._exit_stack.__aexit__(None, None, None)
        return None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with Unavailable.  Idempotent."""
        self._shut(Unavailable("ttrpc: client closed"))
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream)

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_cls: type[Message],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | Sequence[str]] | None = None,
    ) -> Message:
        """Make one unary call and return the decoded response message.

        ``timeout`` (seconds) is sent as ``timeout_nano`` and also bounds the
        local wait: past it the call raises :class:`DeadlineExceeded` and a late
        answer is dropped.  A metadata value may be a list (repeated key).
        """
        if not self._started:
            raise RuntimeError("ttrpc Client used outside 'async with'")
        if self._closed is not None:
            raise Unavailable(self._closed.message)
        stream_id = self._next_stream_id
        if stream_id > frame.STREAM_ID_MAX:
            raise ResourceExhausted("ttrpc: stream ids exhausted on this connection")
        self._next_stream_id += 2
        envelope = ttrpc_pb2.Request(service=service, method=method, payload=request.SerializeToString())
        if timeout is not None:
            if timeout <= 0:
                raise DeadlineExceeded("context deadline exceeded")
            envelope.timeout_nano = max(1, int(timeout * 1e9))
        for key, values in (metadata or {}).items():
            for value in [values] if isinstance(values, str) else values:
                envelope.metadata.add(key=key, value=value)
        try:
            data = frame.encode(stream_id, frame.MESSAGE_TYPE_REQUEST, envelope.SerializeToString())
        except frame.FrameTooLarge as exc:
            raise ResourceExhausted(str(exc)) from None

        pending = _Pending()
        self._pending[stream_id] = pending
        try:
            self._outgoing_send.send_nowait(data)
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await pending.done.wait()
        finally:
            self._pending.pop(stream_id, None)
        if not pending.done.is_set():
            raise DeadlineExceeded("context deadline exceeded")
        if pending.error is not None:
            raise pending.error
        assert pending.response is not None
        status = pending.response.status
        if status.code != Code.OK:
            raise TtrpcError.from_status(status.code, status.message, list(status.details))
        reply = response_cls()
        try:
            reply.ParseFromString(pending.response.payload)
        except Exception as exc:  # DecodeError, or a bad UTF-8 string field
            raise Internal(f"ttrpc: error unmarshalling response payload: {exc}") from None
        return reply

    # -- connection tasks ---------------------------------------------------------

    def _shut(self, reason: TtrpcError) -> None:
        if self._closed is None:
            self._closed = reason
        self._tasks.cancel()
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.finish(error=Unavailable(reason.message))

    async def _run_tasks(self) -> None:
        with self._tasks:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender)
                nursery.start_soon(self._reader)

    async def _sender(self) -> None:
        try:
            async for data in self._outgoing_receive:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._shut(Unavailable(f"ttrpc: connection lost: {exc!r}"))

    async def _reader(self) -> None:
        decoder = frame.FrameDecoder()
        reason = "ttrpc: connection closed"
        try:
            while True:
                data = await self._stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                try:
                    events = decoder.feed(data)
                except frame.FrameError as exc:
                    self._deliver(exc.events)
                    reason = str(exc)
                    break
                self._deliver(events)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"ttrpc: connection lost: {exc!r}"
        self._shut(Unavailable(reason))

    def _deliver(self, events: list[frame.Event]) -> None:
        for event in events:
            if event.type != frame.MESSAGE_TYPE_RESPONSE:
                continue
            waiter = self._pending.get(event.stream_id)
            if waiter is None:
                self._log.debug("ttrpc response for no pending call dropped", stream_id=event.stream_id)
                continue
            if isinstance(event, frame.OversizeFrame):
                waiter.finish(error=ResourceExhausted(
                    f"ttrpc: response length {event.length} exceeds maximum message size of "
                    f"{frame.MESSAGE_LENGTH_MAX}"
                ))
                continue
            response = ttrpc_pb2.Response()
            try:
                response.ParseFromString(event.data)
            except Exception as exc:
                waiter.finish(error=Internal(f"ttrpc: invalid response frame: {exc}"))
                continue
            waiter.finish(response=response)
