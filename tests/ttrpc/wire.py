"""An independent ttrpc peer for the tests, written from the wire description.

It does not use katapy.ttrpc.frame nor the generated protobuf classes: headers
are packed with struct, Request/Response/Status are encoded and decoded as
raw protobuf fields (varint and length-delimited only), so that a bug shared
by katapy's encoder and decoder cannot hide itself.

Wire facts used (containerd/ttrpc PROTOCOL.md, request.proto):
header = length u32 BE | stream_id u32 BE | type u8 | flags u8; request type 1,
response type 2; Request{service=1, method=2, payload=3, timeout_nano=4,
metadata=5 KeyValue{key=1, value=2}}; Response{status=1 Status{code=1,
message=2}, payload=2}.
"""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

REQUEST = 1
RESPONSE = 2
MAX_DATA = 4 * 1024 * 1024


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3 | 0) + varint(value)


def field_bytes(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def header(length: int, stream_id: int, type_: int, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", length, stream_id, type_, flags)


def raw_frame(stream_id: int, type_: int, data: bytes, flags: int = 0) -> bytes:
    return header(len(data), stream_id, type_, flags) + data


def request_body(
    service: str,
    method: str,
    payload: bytes = b"",
    timeout_nano: int = 0,
    metadata: list[tuple[str, str]] | None = None,
) -> bytes:
    body = field_bytes(1, service) + field_bytes(2, method) + field_bytes(3, payload)
    if timeout_nano:
        body += field_varint(4, timeout_nano)
    for key, value in metadata or []:
        body += field_bytes(5, field_bytes(1, key) + field_bytes(2, value))
    return body


def request_frame(stream_id: int, service: str, method: str, payload: bytes = b"", **kw: object) -> bytes:
    return raw_frame(stream_id, REQUEST, request_body(service, method, payload, **kw))  # type: ignore[arg-type]


def string_value(text: str) -> bytes:
    """google.protobuf.StringValue / UInt32Value-free payload: field 1 string."""
    return field_bytes(1, text) if text else b""


def uint_value(n: int) -> bytes:
    return field_varint(1, n) if n else b""


def parse_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """Minimal protobuf decoder: varint (0) and length-delimited (2) fields."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0

    def read_varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = read_varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields.setdefault(number, []).append(read_varint())
        elif wire_type == 2:
            length = read_varint()
            fields.setdefault(number, []).append(data[pos : pos + length])
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
    return fields


def first(fields: dict[int, list[int | bytes]], number: int, default: int | bytes) -> int | bytes:
    values = fields.get(number)
    return values[-1] if values else default


@dataclass
class RawResponse:
    stream_id: int
    flags: int
    code: int
    message: str
    payload: bytes

    @property
    def text(self) -> str:
        """The payload read as a StringValue."""
        return bytes(first(parse_fields(self.payload), 1, b"")).decode()  # type: ignore[arg-type]

    @property
    def number(self) -> int:
        """The payload read as a UInt32Value."""
        return int(first(parse_fields(self.payload), 1, 0))  # type: ignore[arg-type]


@dataclass
class RawRequest:
    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int
    metadata: list[tuple[str, str]]


def parse_response(stream_id: int, flags: int, data: bytes) -> RawResponse:
    fields = parse_fields(data)
    status = parse_fields(bytes(first(fields, 1, b"")))  # type: ignore[arg-type]
    return RawResponse(
        stream_id,
        flags,
        int(first(status, 1, 0)),  # type: ignore[arg-type]
        bytes(first(status, 2, b"")).decode(),  # type: ignore[arg-type]
        bytes(first(fields, 2, b"")),  # type: ignore[arg-type]
    )


def parse_request(stream_id: int, data: bytes) -> RawRequest:
    fields = parse_fields(data)
    metadata = []
    for kv in fields.get(5, []):
        kv_fields = parse_fields(bytes(kv))  # type: ignore[arg-type]
        metadata.append(
            (bytes(first(kv_fields, 1, b"")).decode(), bytes(first(kv_fields, 2, b"")).decode())  # type: ignore[arg-type]
        )
    return RawRequest(
        stream_id,
        bytes(first(fields, 1, b"")).decode(),  # type: ignore[arg-type]
        bytes(first(fields, 2, b"")).decode(),  # type: ignore[arg-type]
        bytes(first(fields, 3, b"")),  # type: ignore[arg-type]
        int(first(fields, 4, 0)),  # type: ignore[arg-type]
        metadata,
    )


def response_frame(stream_id: int, code: int = 0, message: str = "", payload: bytes = b"") -> bytes:
    status = (field_varint(1, code) if code else b"") + (field_bytes(2, message) if message else b"")
    return raw_frame(stream_id, RESPONSE, field_bytes(1, status) + (field_bytes(2, payload) if payload else b""))


class RawPeer:
    """A blocking socket speaking hand-made ttrpc frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    def connect(cls, path: str) -> RawPeer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"peer: waited for {n} bytes, have {len(self.buf)}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv_frame(self, timeout: float = 5.0) -> tuple[int, int, int, bytes] | None:
        """(stream_id, type, flags, data), or None at EOF."""
        deadline = time.monotonic() + timeout
        if not self._fill(10, deadline):
            return None
        length, stream_id, type_, flags = struct.unpack(">IIBB", self.buf[:10])
        if not self._fill(10 + length, deadline):
            return None
        data = self.buf[10 : 10 + length]
        self.buf = self.buf[10 + length :]
        return stream_id, type_, flags, data

    def recv_response(self, timeout: float = 5.0) -> RawResponse:
        got = self.recv_frame(timeout)
        assert got is not None, "connection closed instead of a response"
        stream_id, type_, flags, data = got
        assert type_ == RESPONSE, f"frame type {type_}"
        return parse_response(stream_id, flags, data)

    def recv_request(self, timeout: float = 5.0) -> RawRequest | None:
        got = self.recv_frame(timeout)
        if got is None:
            return None
        stream_id, type_, _, data = got
        assert type_ == REQUEST, f"frame type {type_}"
        return parse_request(stream_id, data)

    def call(self, stream_id: int, service: str, method: str, payload: bytes = b"", **kw: object) -> RawResponse:
        self.send(request_frame(stream_id, service, method, payload, **kw))
        return self.recv_response()

    def expect_eof(self, timeout: float = 5.0) -> None:
        """The server closes the connection (any bytes before EOF are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("peer: connection not closed by the server")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return
            if not chunk:
                return

    def close(self) -> None:
        self.sock.close()
