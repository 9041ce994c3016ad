"""Server-side request handling shared by the trio server and the threaded server.

Everything here is synchronous and transport-free: it turns a received frame
into either a ready :class:`Call` (handler found, request decoded) or the bytes
of an error response, and turns a handler's outcome into response bytes.  The
rules follow containerd/ttrpc ``server.go`` (PROTOCOL.md "Request",
"Response"):

* an even stream id is refused with INVALID_ARGUMENT on that id;
* an undecodable ``Request`` envelope gets INVALID_ARGUMENT;
* an unknown service or method gets UNIMPLEMENTED;
* an undecodable payload gets INTERNAL "ttrpc: error unmarshalling payload";
* ``timeout_nano`` > 0 is the handler's deadline;
* on any error the response payload is empty.

Standard library + protobuf only (no trio): the guest agent imports it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from katapy.pb import ttrpc_pb2
from katapy.ttrpc import frame
from katapy.ttrpc.errors import Code, TtrpcError

# (request message class, handler).  The handler is ``async def h(req, ctx)``
# for the trio server and ``def h(req, ctx)`` for the threaded server.
Method = tuple[type[Message], Callable[..., Any]]

MSG_UNMARSHAL = "ttrpc: error unmarshalling payload"
MSG_EVEN_STREAM = "StreamID must be odd for client initiated streams"
MSG_STREAM_IN_USE = "StreamID already in use"


@dataclass
class RequestContext:
    """What a handler learns about its call besides the request message.

    ``deadline`` is absolute on the serving side's clock (``trio.current_time()``
    for the trio server, ``time.monotonic()`` for the threaded one), or None.
    ``metadata`` maps each key to all the values sent for it, in order.
    ``cancelled`` is set once the answer no longer matters (deadline passed or
    connection gone): threaded handlers may poll it; trio handlers are simply
    cancelled.
    """

    service: str
    method: str
    stream_id: int
    metadata: dict[str, list[str]] = field(default_factory=dict)
    timeout: float | None = None
    deadline: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Call:
    """A decoded request ready to run."""

    stream_id: int
    request: Message
    handler: Callable[..., Any]
    context: RequestContext


class Registry:
    """service name -> method name -> :data:`Method`."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, Method]] = {}

    def register(self, service: str, methods: Mapping[str, Method]) -> None:
        """Add (or extend) ``service`` with ``methods``; a method name may be registered once."""
        if not service:
            raise ValueError("ttrpc: empty service name")
        table = self._services.setdefault(service, {})
        for name, method in methods.items():
            if name in table:
                raise ValueError(f"ttrpc: method {service}/{name} already registered")
            request_cls, handler = method
            if not (isinstance(request_cls, type) and issubclass(request_cls, Message)):
                raise TypeError(f"ttrpc: {service}/{name}: {request_cls!r} is not a protobuf message class")
            if not callable(handler):
                raise TypeError(f"ttrpc: {service}/{name}: handler is not callable")
            table[name] = (request_cls, handler)

    def lookup(self, service: str, method: str) -> Method:
        table = self._services.get(service)
        if table is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"service {service}")
        found = table.get(method)
        if found is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"method {method}")
        return found


def error_response(stream_id: int, code: int, message: str, details: list[Any] | None = None) -> bytes:
    """A response frame carrying a failed status and an empty payload."""
    status = ttrpc_pb2.Status(code=int(code), message=message)
    for detail in details or []:
        status.details.add().CopyFrom(detail)
    body = ttrpc_pb2.Response(status=status).SerializeToString()
    return frame.encode(stream_id, frame.MESSAGE_TYPE_RESPONSE, body)


def success_response(stream_id: int, message: Message) -> bytes:
    """A response frame with status OK; RESOURCE_EXHAUSTED if the reply is over 4 MiB."""
    body = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=Code.OK), payload=message.SerializeToString())
    try:
        return frame.encode(stream_id, frame.MESSAGE_TYPE_RESPONSE, body.SerializeToString())
    except frame.FrameTooLarge as exc:
        return error_response(stream_id, Code.RESOURCE_EXHAUSTED, str(exc))


def outcome_response(stream_id: int, result: object = None, error: BaseException | None = None) -> bytes:
    """Response bytes for a finished handler: its message, or the status of its exception.

    A :class:`TtrpcError` keeps its code; any other exception becomes UNKNOWN
    with its text (as Go's ``status.FromError`` does for a plain error).
    """
    if error is not None:
        if isinstance(error, TtrpcError):
            return error_response(stream_id, error.code, error.message, error.details)
        return error_response(stream_id, Code.UNKNOWN, f"{type(error).__name__}: {error}")
    if not isinstance(result, Message):
        return error_response(
            stream_id, Code.INTERNAL, f"ttrpc: handler returned {type(result).__name__}, not a protobuf message"
        )
    return success_response(stream_id, result)


def oversize_response(event: frame.OversizeFrame) -> bytes:
    return error_response(
        event.stream_id,
        Code.RESOURCE_EXHAUSTED,
        f"ttrpc: message length {event.length} exceeds maximum message size of {frame.MESSAGE_LENGTH_MAX}",
    )


def prepare(registry: Registry, received: frame.Frame, in_use: Callable[[int], bool]) -> Call | bytes | None:
    """Decode a received frame into a :class:`Call`, or the error response to send.

    Returns None for frames a unary server ignores (responses, data, unknown
    types).  ``in_use(stream_id)`` says whether that id is still being served.
    The caller sets ``context.deadline`` from ``context.timeout`` on its own clock.
    """
    if received.type != frame.MESSAGE_TYPE_REQUEST:
        return None
    sid = received.stream_id
    if sid % 2 != 1:
        return error_response(sid, Code.INVALID_ARGUMENT, MSG_EVEN_STREAM)
    if in_use(sid):
        return error_response(sid, Code.INVALID_ARGUMENT, MSG_STREAM_IN_USE)
    envelope = ttrpc_pb2.Request()
    try:
        envelope.ParseFromString(received.data)
    except Exception as exc:  # DecodeError, or a bad UTF-8 string field
        return error_response(sid, Code.INVALID_ARGUMENT, f"ttrpc: invalid request: {exc}")
    try:
        request_cls, handler = registry.lookup(envelope.service, envelope.method)
    except TtrpcError as exc:
        return error_response(sid, exc.code, exc.message)
    request = request_cls()
    try:
        request.ParseFromString(envelope.payload)
    except Exception:  # DecodeError, or a bad UTF-8 string field
        return error_response(sid, Code.INTERNAL, MSG_UNMARSHAL)
    metadata: dict[str, list[str]] = {}
    for kv in envelope.metadata:
        metadata.setdefault(kv.key, []).append(kv.value)
    timeout = envelope.timeout_nano / 1e9 if envelope.timeout_nano > 0 else None
    ctx = RequestContext(envelope.service, envelope.method, sid, metadata, timeout)
    return Call(sid, request, handler, ctx)
