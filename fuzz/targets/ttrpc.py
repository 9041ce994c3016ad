"""Target ``ttrpc``: ttrpc frames as the agent and the shim receive them (katapy.ttrpc).

Fuzzed: a byte stream cut into input-chosen chunks and fed to
``FrameDecoder`` (headers with any length, the reserved byte, 4 MiB+
oversize frames, every type and flags byte), then each frame through the
server side (``dispatch.prepare`` against the agent's and the shim's real
method tables, then ``outcome_response``) and through the client side
(``Client._deliver`` with calls pending, ``TtrpcError.from_status``).
Frames are raw bytes or ``Request`` envelopes with real or unknown
service/method names, payloads that are valid requests or garbage, metadata
and timeouts.

Clean errors: FrameError (the connection is closed).  Checked: every response
the server side produces is one well-formed RESPONSE frame on the request's
stream whose ``Response`` decodes.
"""
from __future__ import annotations

import struct

from fuzz.common import Input
from katapy.pb import agent_pb2, ttrpc_pb2
from katapy.ttrpc import dispatch, frame
from katapy.ttrpc.client import Client, _Pending
from katapy.ttrpc.errors import TtrpcError

_registry: list[dispatch.Registry] = []
_METHODS: list[tuple[str, str, type]] = []


def _real_registry() -> dispatch.Registry:
    """The method tables the guest agent and the shim serve (handlers are never run here)."""
    if not _registry:
        from katapy.agent.server import AgentServer
        from katapy.shim.service import TaskService

        reg = dispatch.Registry()
        AgentServer.register(object.__new__(AgentServer), reg)
        TaskService.register(object.__new__(TaskService), reg)
        for service, table in reg._services.items():
            for method, (cls, _) in table.items():
                _METHODS.append((service, method, cls))
        _registry.append(reg)
    return _registry[0]


def _envelope(inp: Input) -> bytes:
    service, method, cls = inp.pick(_METHODS)
    if inp.one_in(8):
        service = inp.pick((service + "x", "", "grpc.health.v1.Health", inp.blob(8).decode("latin-1")))
    if inp.one_in(8):
        method = inp.pick(("", "Nope", method.lower()))
    payload = cls().SerializeToString() if inp.one_in(2) else inp.blob(40)
    if cls is agent_pb2.ExecProcessRequest and inp.one_in(2):
        payload = agent_pb2.ExecProcessRequest(container_id="c", exec_id="e").SerializeToString()
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                            timeout_nano=inp.pick((0, 0, 1, 10**9, -1, inp.u64() >> 1)))
    for _ in range(inp.u8() % 3):
        req.metadata.add(key=inp.pick(("k", "", "x" * 40)), value=inp.blob(8).decode("latin-1"))
    raw = req.SerializeToString()
    if inp.one_in(16):
        raw += b"\xff\xff"  # trailing garbage: an unknown field or a truncated varint
    return raw


def _stream(inp: Input) -> bytes:
    out = b""
    for _ in range(1 + inp.u8() % 6):
        kind = inp.u8() % 8
        if kind == 0:
            out += inp.blob(24)  # raw bytes, usually a broken or partial header
            continue
        sid = inp.pick((1, 3, 5, 2, 0, 0xFFFFFFFF, inp.u32()))
        mtype = inp.pick((1, 1, 1, 2, 3, 0, inp.u8()))
        flags = inp.pick((0, 0, 1, 2, 4, inp.u8()))
        data = _envelope(inp) if mtype == 1 and kind > 2 else inp.blob(32)
        if kind == 1:  # a header whose length lies: oversize, or longer than what follows
            length = inp.pick((frame.MESSAGE_LENGTH_MAX + 1, len(data) + 5, frame.RESERVED_LENGTH_LIMIT, inp.u32()))
            out += struct.pack(">IIBB", length, sid, mtype, flags) + data
        else:
            out += frame.encode(sid, mtype, data, flags)
    return out


def _chunks(inp: Input, raw: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        n = inp.pick((len(raw), 1, 7, 10, 64, inp.u16() + 1))
        out.append(raw[pos : pos + n])
        pos += n
    return out


def _check_response(raw: bytes, sid: int) -> None:
    events = frame.FrameDecoder().feed(raw)
    assert len(events) == 1 and isinstance(events[0], frame.Frame), "a response is not exactly one frame"
    ev = events[0]
    assert ev.stream_id == sid and ev.type == frame.MESSAGE_TYPE_RESPONSE, f"bad response frame {ev}"
    ttrpc_pb2.Response().ParseFromString(ev.data)


def _serve(inp: Input, events: list[frame.Event], registry: dispatch.Registry, active: set[int]) -> None:
    for ev in events:
        if isinstance(ev, frame.OversizeFrame):
            _check_response(dispatch.oversize_response(ev), ev.stream_id)
            continue
        prepared = dispatch.prepare(registry, ev, active.__contains__)
        if isinstance(prepared, bytes):
            _check_response(prepared, ev.stream_id)
        elif prepared is not None:
            active.add(prepared.stream_id)
            outcome = inp.u8() % 4
            if outcome == 0:
                raw = dispatch.outcome_response(prepared.stream_id, prepared.request)
            elif outcome == 1:
                raw = dispatch.outcome_response(prepared.stream_id, error=TtrpcError(inp.u8(), "no"))
            elif outcome == 2:
                raw = dispatch.outcome_response(prepared.stream_id, error=ValueError("bad"))
            else:
                raw = dispatch.outcome_response(prepared.stream_id, result="not a message")
            _check_response(raw, prepared.stream_id)


def _client_side(chunks: list[bytes]) -> None:
    """The same bytes as responses arriving at a client with calls 1, 3 and 5 pending."""
    client = Client(None)  # type: ignore[arg-type]  # never started: only its delivery is fuzzed
    pending = {sid: _Pending() for sid in (1, 3, 5)}
    client._pending.update(pending)
    decoder = frame.FrameDecoder()
    for chunk in chunks:
        try:
            events = decoder.feed(chunk)
        except frame.FrameError as e:
            client._deliver(e.events)
            break
        client._deliver(events)
    for p in pending.values():
        if p.response is not None and p.response.status.code:
            status = p.response.status
            assert isinstance(TtrpcError.from_status(status.code, status.message, list(status.details)), TtrpcError)


def fuzz_one(data: bytes) -> None:
    inp = Input(data)
    registry = _real_registry()
    chunks = _chunks(inp, _stream(inp))
    decoder = frame.FrameDecoder()
    active: set[int] = set()
    for chunk in chunks:
        try:
            events = decoder.feed(chunk)
        except frame.FrameError as e:
            _serve(inp, e.events, registry, active)
            break
        _serve(inp, events, registry, active)
    _client_side(chunks)
