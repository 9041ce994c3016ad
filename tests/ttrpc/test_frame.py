"""FrameDecoder / encode: unit checks and hypothesis fuzzing against the hand-built encoder."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from katapy.ttrpc import frame
from katapy.ttrpc.errors import Code, NotFound, TtrpcError, Unavailable

from . import wire

frames_st = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF_FFFF),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=300),
    ),
    max_size=12,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


def decode_all(pieces: list[bytes]) -> tuple[list[frame.Event], bool]:
    """Events from feeding ``pieces`` in order, and whether a FrameError ended the stream."""
    decoder = frame.FrameDecoder()
    events: list[frame.Event] = []
    for piece in pieces:
        try:
            events += decoder.feed(piece)
        except frame.FrameError as exc:
            events += exc.events
            with pytest.raises(frame.FrameError):
                decoder.feed(b"")  # dead for good
            return events, True
        assert decoder.buffered <= frame.HEADER_LENGTH + frame.MESSAGE_LENGTH_MAX
    return events, False


@settings(max_examples=200, deadline=None)
@given(frames_st, st.lists(st.integers(0, 10_000), max_size=20))
def test_round_trip_in_any_split(frames: list, cuts: list[int]) -> None:
    data = b"".join(wire.raw_frame(sid, t, payload, flags) for sid, t, flags, payload in frames)
    assert data == b"".join(frame.encode(sid, t, payload, flags) for sid, t, flags, payload in frames)
    events, failed = decode_all(split(data, cuts))
    assert not failed
    assert events == [frame.Frame(sid, t, flags, payload) for sid, t, flags, payload in frames]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 5000), max_size=20))
def test_arbitrary_bytes_never_crash_and_split_does_not_matter(data: bytes, cuts: list[int]) -> None:
    whole = decode_all([data])
    pieces = decode_all(split(data, cuts))
    assert whole == pieces
    for event in whole[0]:
        if isinstance(event, frame.Frame):
            assert len(event.data) <= frame.MESSAGE_LENGTH_MAX
        else:
            assert frame.MESSAGE_LENGTH_MAX < event.length < frame.RESERVED_LENGTH_LIMIT


@settings(max_examples=50, deadline=None)
@given(
    st.integers(frame.MESSAGE_LENGTH_MAX + 1, frame.MESSAGE_LENGTH_MAX + 5000),
    st.integers(1, 0xFFFF_FFFF),
    st.lists(st.integers(0, 10_000), max_size=6),
)
def test_oversize_body_is_discarded_then_decoding_resumes(length: int, sid: int, cuts: list[int]) -> None:
    good = wire.raw_frame(9, 1, b"after")
    data = wire.header(length, sid, 1) + bytes(length) + good
    events, failed = decode_all(split(data, [c * 500 for c in cuts]))
    assert not failed
    assert events == [frame.OversizeFrame(sid, 1, 0, length), frame.Frame(9, 1, 0, b"after")]


def test_reserved_byte_is_fatal_but_keeps_earlier_frames() -> None:
    decoder = frame.FrameDecoder()
    good = wire.raw_frame(1, 1, b"ok")
    with pytest.raises(frame.FrameError) as info:
        decoder.feed(good + b"\x01" + bytes(20))
    assert info.value.events == [frame.Frame(1, 1, 0, b"ok")]
    with pytest.raises(frame.FrameError):
        decoder.feed(good)


def test_boundary_tracking() -> None:
    decoder = frame.FrameDecoder()
    data = wire.raw_frame(1, 2, b"abc")
    assert decoder.at_boundary
    assert decoder.feed(data[:4]) == [] and not decoder.at_boundary
    assert decoder.feed(data[4:]) == [frame.Frame(1, 2, 0, b"abc")] and decoder.at_boundary


def test_encode_limits() -> None:
    frame.encode(1, 1, bytes(frame.MESSAGE_LENGTH_MAX))
    with pytest.raises(frame.FrameTooLarge):
        frame.encode(1, 1, bytes(frame.MESSAGE_LENGTH_MAX + 1))
    with pytest.raises(ValueError):
        frame.encode(1 << 32, 1, b"")
    with pytest.raises(ValueError):
        frame.encode(1, 256, b"")


def test_errors_from_status() -> None:
    err = TtrpcError.from_status(5, "no such thing")
    assert isinstance(err, NotFound) and err.code is Code.NOT_FOUND and err.message == "no such thing"
    assert isinstance(TtrpcError.from_status(14, "x"), Unavailable)
    odd = TtrpcError.from_status(1234, "?")
    assert type(odd) is TtrpcError and odd.code == 1234
    with pytest.raises(ValueError):
        TtrpcError.from_status(0, "")
    assert str(NotFound("c1")) == "ttrpc: NOT_FOUND: c1"
    assert [c.value for c in Code] == list(range(17))


def test_package_import_does_not_load_trio() -> None:
    import subprocess
    import sys

    code = (
        "import sys, katapy.ttrpc, katapy.ttrpc.sync_server, katapy.ttrpc.dispatch;"
        "assert 'trio' not in sys.modules, 'trio was imported';"
        "assert 'structlog' not in sys.modules, 'structlog was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})
