"""virtio-blk requests (virtio 1.2, section 5.2.6 "Device Operation").

A request is one descriptor chain::

    struct virtio_blk_req {
        le32 type; le32 reserved; le64 sector;   /* device-readable header */
        u8 data[];                               /* readable (OUT, DISCARD, WRITE_ZEROES) or writable (IN, GET_ID) */
        u8 status;                               /* last device-writable byte */
    };

The spec lets the driver lay the parts out over descriptors any way it likes
(2.7.4 "Message Framing", VIRTIO_F_VERSION_1 implies ANY_LAYOUT), so the
header is read as a byte stream and the status byte is the last writable
byte, wherever descriptor boundaries fall.  Everything is checked: a chain
too short for the header or without a writable status byte, a data length
that is not whole sectors, a range past the capacity.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from katapy.vmm.virtio.queue import DescriptorChain

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
HEADER = struct.Struct("<IIQ")  # type, reserved, sector
#: struct virtio_blk_discard_write_zeroes (5.2.6): le64 sector; le32 num_sectors; le32 flags
SEGMENT = struct.Struct("<QII")
SEGMENT_FLAG_UNMAP = 1
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES


class RequestType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class NoStatusByte(Exception):
    """The chain has no device-writable byte: the request cannot even be answered."""


@dataclass
class Request:
    """A parsed request: header fields, the data ranges and where the status byte goes.

    ``error`` is set when the request is malformed; it is then answered with
    IOERR and no data.
    """

    type: int
    sector: int
    #: guest ranges of the payload: readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID
    data: list[tuple[int, int]] = field(default_factory=list)
    status_addr: int = 0
    error: str | None = None

    @property
    def data_len(self) -> int:
        return sum(n for _, n in self.data)


def _split_tail_byte(ranges: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
    """``ranges`` minus their very last byte, and that byte's address."""
    ranges = [(a, n) for a, n in ranges if n > 0]
    if not ranges:
        raise NoStatusByte("request has no device-writable status byte")
    addr, n = ranges[-1]
    head = ranges[:-1] + ([(addr, n - 1)] if n > 1 else [])
    return head, addr + n - 1


def _skip(ranges: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """``ranges`` without their first ``count`` bytes."""
    out = []
    for addr, n in ranges:
        if count >= n:
            count -= n
            continue
        out.append((addr + count, n - count))
        count = 0
    return out


#: request types whose payload the device writes
DEVICE_WRITES = (RequestType.IN, RequestType.GET_ID, RequestType.GET_LIFETIME)


def parse(chain: DescriptorChain) -> Request:
    """Split ``chain`` into header, payload and status byte (5.2.6); raises NoStatusByte."""
    writable, status_addr = _split_tail_byte(chain.writable)
    raw = chain.reader().read(HEADER.size)
    if len(raw) < HEADER.size:
        return Request(-1, 0, [], status_addr, f"request header is {len(raw)} bytes, needs {HEADER.size}")
    rtype, _reserved, sector = HEADER.unpack(raw)
    readable_rest = _skip(chain.readable, HEADER.size)
    if rtype in DEVICE_WRITES:
        data, wrong = writable, readable_rest
    else:
        data, wrong = readable_rest, writable
    req = Request(rtype, sector, data, status_addr)
    extra = sum(n for _, n in wrong)
    if extra:
        req.error = f"request type {rtype} carries {extra} payload bytes in the wrong direction"
    return req
