"""ttrpc framing: the 10-byte message header and an incremental decoder.

Wire format (containerd/ttrpc ``PROTOCOL.md`` "Message Frame", ``channel.go``)::

    +----------------+----------------+--------+--------+----------------
    | length u32 BE  | stream_id u32 BE | type u8| flags u8| data[length]
    +----------------+----------------+--------+--------+----------------

``length`` counts the data only.  Data longer than 4 MiB (``messageLengthMax``)
is refused: the receiver discards the bytes and answers on that stream with
RESOURCE_EXHAUSTED.  Because the maximum is below 16 MiB, the first header byte
is reserved and always zero; katapy treats a non-zero reserved byte as proof
that the peer is not speaking ttrpc (see :class:`FrameDecoder`).

Pure Python, standard library only: shared by the trio server/client and by the
threaded server the guest agent runs.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct(">IIBB")
HEADER_LENGTH = HEADER.size  # 10
MESSAGE_LENGTH_MAX = 4 << 20
# Lengths of 16 MiB and more set the reserved first byte of the header.
RESERVED_LENGTH_LIMIT = 1 << 24
STREAM_ID_MAX = 0xFFFF_FFFF


class MessageType(IntEnum):
    """Frame ``type`` byte (PROTOCOL.md "Message Types")."""

    REQUEST = 1
    RESPONSE = 2
    DATA = 3


MESSAGE_TYPE_REQUEST = MessageType.REQUEST
MESSAGE_TYPE_RESPONSE = MessageType.RESPONSE
MESSAGE_TYPE_DATA = MessageType.DATA

# Flags (ttrpc 1.2 streaming).  Unary calls always send 0.
FLAG_REMOTE_CLOSED = 0x01
FLAG_REMOTE_OPEN = 0x02
FLAG_NO_DATA = 0x04


class FrameError(Exception):
    """The byte stream cannot be ttrpc: the connection must be closed.

    ``events`` holds the well-formed frames decoded from the same :meth:`FrameDecoder.feed`
    call before the corruption, so a receiver can still answer them.
    """

    def __init__(self, message: str, events: list[Frame | OversizeFrame] | None = None) -> None:
        super().__init__(message)
        self.events: list[Frame | OversizeFrame] = events or []


class FrameTooLarge(ValueError):
    """An outgoing message exceeds :data:`MESSAGE_LENGTH_MAX`."""

    def __init__(self, length: int) -> None:
        super().__init__(
            f"ttrpc: message length {length} exceeds maximum message size of {MESSAGE_LENGTH_MAX}"
        )
        self.length = length


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete frame.  ``type`` is kept as a raw int: unknown types are legal."""

    stream_id: int
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizeFrame:
    """A header announced more than 4 MiB of data; the data is being discarded.

    Reported as soon as the header is read so that the receiver can answer
    RESOURCE_EXHAUSTED without waiting for the (possibly huge) body.
    """

    stream_id: int
    type: int
    flags: int
    length: int


Event = Frame | OversizeFrame


def encode(stream_id: int, type: int, data: bytes, flags: int = 0) -> bytes:
    """Serialize one frame.  Raises :class:`FrameTooLarge` past 4 MiB of data."""
    if len(data) > MESSAGE_LENGTH_MAX:
        raise FrameTooLarge(len(data))
    if not 0 <= stream_id <= STREAM_ID_MAX:
        raise ValueError(f"ttrpc: stream id {stream_id} out of range")
    if not (0 <= type <= 0xFF and 0 <= flags <= 0xFF):
        raise ValueError(f"ttrpc: type {type} / flags {flags} do not fit a byte")
    return HEADER.pack(len(data), stream_id, type, flags) + data


class FrameDecoder:
    """Turns received bytes into :class:`Frame` / :class:`OversizeFrame` events.

    Feed it whatever the transport delivered, in any split; it buffers at most
    one header plus one 4 MiB body.  A header whose reserved byte is set (a
    length of 16 MiB or more, which no ttrpc peer can send) raises
    :class:`FrameError` carrying the frames decoded before it; the decoder is
    then dead, every later :meth:`feed` raises again, and the caller closes the
    connection.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._discard = 0  # body bytes of an oversize frame still to drop
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (0 at a frame boundary)."""
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending: EOF here is a clean close."""
        return not self._buf and self._discard == 0

    def feed(self, data: bytes) -> list[Event]:
        if self._error is not None:
            raise self._error
        events: list[Event] = []
        view = memoryview(data)
        if self._discard:
            n = min(self._discard, len(view))
            self._discard -= n
            view = view[n:]
        self._buf += view
        pos = 0
        buf = self._buf
        while len(buf) - pos >= HEADER_LENGTH:
            length, stream_id, type_, flags = HEADER.unpack_from(buf, pos)
            if length >= RESERVED_LENGTH_LIMIT:
                del buf[:pos]
                message = f"ttrpc: reserved header byte set (length {length}); not a ttrpc stream"
                self._error = FrameError(message)
                raise FrameError(message, events)
            if length > MESSAGE_LENGTH_MAX:
                events.append(OversizeFrame(stream_id, type_, flags, length))
                pos += HEADER_LENGTH
                available = len(buf) - pos
                n = min(available, length)
                pos += n
                self._discard = length - n
                continue
            end = pos + HEADER_LENGTH + length
            if end > len(buf):
                break
            events.append(Frame(stream_id, type_, flags, bytes(buf[pos + HEADER_LENGTH : end])))
            pos = end
        del buf[:pos]
        return events
