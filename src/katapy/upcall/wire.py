"""dbs-upcall device-manager messages: framing, encoding and strict decoding.

Facts (Kata ``src/dragonball/crates/dbs_upcall/src/dev_mgr_service.rs`` and the
guest patch ``0003-upcall-add-device-manager-service``; summarised in
docs/protocols.md):

* The channel is a host-initiated vsock stream to guest port 0xDB.  After the
  hybrid-vsock ``CONNECT 219`` handshake the VMM writes one service byte,
  ``b"d"`` (device manager); the guest answers at once with a CONNECT message.
* Every message, either way, is exactly :data:`MSG_SIZE` (0x400) bytes: a
  16-byte little-endian header ``{u32 magic_version, u32 msg_size, u32
  msg_type, u32 msg_flags}`` then the payload, zero-padded.
* A reply repeats the request's ``msg_type``; its payload starts with an
  ``i32 ret`` (0 or a negative errno) and the type's reply payload.
* Request payloads: CPU ``{u8 count, u8 apic_ver, u8 apic_ids[256]}``; MMIO
  ``{u64 base, u64 size, u32 irq}`` (24 bytes with padding).  Memory has no
  payload in upstream's list of implemented services; katapy's ADD_MEM/DEL_MEM
  carry ``{u64 base, u64 size}`` (16 bytes), the same shape as MMIO's first
  two fields.

Decoding trusts nothing: a wrong magic, a size that does not match the type,
an unknown type or a short buffer raise :class:`UpcallProtocolError`.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

#: guest vsock port of the upcall server (dbs-upcall ``SERVER_PORT``)
UPCALL_PORT = 0xDB
#: the service byte that selects the device manager after the vsock handshake
DEV_MGR_SERVICE = b"d"
#: 'DM' protocol version 1.0
MAGIC_VERSION = 0x444D0100
#: every message on the wire has exactly this size
MSG_SIZE = 0x400
HEADER = struct.Struct("<IIII")
MAX_APIC_IDS = 256

_CPU = struct.Struct(f"<BB{MAX_APIC_IDS}s")
_MMIO = struct.Struct("<QQI4x")
_MEM = struct.Struct("<QQ")
_RET = struct.Struct("<i")
_CPU_REPLY = struct.Struct("<I")


class UpcallProtocolError(ValueError):
    """A message that does not follow the wire format."""


class MsgType(enum.IntEnum):
    CONNECT = 0
    ADD_CPU = 1
    DEL_CPU = 2
    ADD_MEM = 3
    DEL_MEM = 4
    ADD_MMIO = 5
    DEL_MMIO = 6
    ADD_PCI = 7
    DEL_PCI = 8


@dataclass(frozen=True)
class CpuRequest:
    """ADD_CPU / DEL_CPU: the APIC ids of the vCPUs to bring into (or take out of) use."""

    apic_ids: tuple[int, ...]
    apic_ver: int = 0x14  # the local APIC version KVM reports (GET_LAPIC's version register)


@dataclass(frozen=True)
class MemRequest:
    """ADD_MEM / DEL_MEM: a guest-physical range (memory-block aligned)."""

    base: int
    size: int


@dataclass(frozen=True)
class MmioRequest:
    """ADD_MMIO / DEL_MMIO: a virtio-mmio window and its interrupt line."""

    base: int
    size: int
    irq: int


Payload = CpuRequest | MemRequest | MmioRequest | None

_PAYLOAD_SIZE = {
    MsgType.CONNECT: 0,
    MsgType.ADD_CPU: _CPU.size, MsgType.DEL_CPU: _CPU.size,
    MsgType.ADD_MEM: _MEM.size, MsgType.DEL_MEM: _MEM.size,
    MsgType.ADD_MMIO: _MMIO.size, MsgType.DEL_MMIO: _MMIO.size,
}


@dataclass(frozen=True)
class Request:
    type: MsgType
    payload: Payload = None


@dataclass(frozen=True)
class Reply:
    """The guest's answer: ``ret`` 0 or a negative errno; ``cpu_index`` for CPU requests (the first failed)."""

    type: MsgType
    ret: int
    cpu_index: int = 0

    @property
    def ok(self) -> bool:
        return self.ret == 0


def _frame(msg_type: int, payload: bytes) -> bytes:
    if HEADER.size + len(payload) > MSG_SIZE:
        raise UpcallProtocolError(f"payload of {len(payload)} bytes does not fit a {MSG_SIZE:#x}-byte message")
    head = HEADER.pack(MAGIC_VERSION, len(payload), int(msg_type), 0)
    return (head + payload).ljust(MSG_SIZE, b"\0")


def _header(buf: bytes) -> tuple[MsgType, int]:
    if len(buf) != MSG_SIZE:
        raise UpcallProtocolError(f"message of {len(buf)} bytes, expected {MSG_SIZE:#x}")
    magic, size, mtype, flags = HEADER.unpack_from(buf)
    if magic != MAGIC_VERSION:
        raise UpcallProtocolError(f"bad magic/version {magic:#010x} (expected {MAGIC_VERSION:#010x})")
    if flags != 0:
        raise UpcallProtocolError(f"unknown message flags {flags:#x}")
    try:
        t = MsgType(mtype)
    except ValueError:
        raise UpcallProtocolError(f"unknown message type {mtype}") from None
    if size > MSG_SIZE - HEADER.size:
        raise UpcallProtocolError(f"payload size {size} exceeds the message")
    return t, size


def encode_request(req: Request) -> bytes:
    p = req.payload
    if req.type is MsgType.CONNECT:
        body = b""
    elif req.type in (MsgType.ADD_CPU, MsgType.DEL_CPU) and isinstance(p, CpuRequest):
        if not 0 < len(p.apic_ids) <= MAX_APIC_IDS or any(not 0 <= a <= 0xFF for a in p.apic_ids):
            raise UpcallProtocolError(f"APIC ids {p.apic_ids!r}: 1..{MAX_APIC_IDS} ids of 0..255")
        body = _CPU.pack(len(p.apic_ids), p.apic_ver, bytes(p.apic_ids))
    elif req.type in (MsgType.ADD_MEM, MsgType.DEL_MEM) and isinstance(p, MemRequest):
        body = _MEM.pack(p.base, p.size)
    elif req.type in (MsgType.ADD_MMIO, MsgType.DEL_MMIO) and isinstance(p, MmioRequest):
        body = _MMIO.pack(p.base, p.size, p.irq)
    else:
        raise UpcallProtocolError(f"{req.type.name} cannot carry {type(p).__name__}")
    return _frame(req.type, body)


def decode_request(buf: bytes) -> Request:
    t, size = _header(buf)
    want = _PAYLOAD_SIZE.get(t)
    if want is None:
        raise UpcallProtocolError(f"{t.name} is not a request katapy serves")
    if size != want:
        raise UpcallProtocolError(f"{t.name} payload of {size} bytes, expected {want}")
    body = buf[HEADER.size:HEADER.size + size]
    if t in (MsgType.ADD_CPU, MsgType.DEL_CPU):
        count, ver, ids = _CPU.unpack(body)
        if not 0 < count <= MAX_APIC_IDS:
            raise UpcallProtocolError(f"{t.name} with {count} APIC ids")
        return Request(t, CpuRequest(tuple(ids[:count]), ver))
    if t in (MsgType.ADD_MEM, MsgType.DEL_MEM):
        return Request(t, MemRequest(*_MEM.unpack(body)))
    if t in (MsgType.ADD_MMIO, MsgType.DEL_MMIO):
        return Request(t, MmioRequest(*_MMIO.unpack(body)))
    return Request(t)


def encode_reply(reply: Reply) -> bytes:
    body = _RET.pack(reply.ret)
    if reply.type in (MsgType.ADD_CPU, MsgType.DEL_CPU):
        body += _CPU_REPLY.pack(reply.cpu_index)
    return _frame(reply.type, body)


def decode_reply(buf: bytes, expect: MsgType) -> Reply:
    """A reply to a request of type ``expect`` (CONNECT: the guest's greeting, no ``ret``)."""
    t, size = _header(buf)
    if t is not expect:
        raise UpcallProtocolError(f"reply of type {t.name} to a {expect.name} request")
    if t is MsgType.CONNECT:
        if size != 0:
            raise UpcallProtocolError(f"CONNECT greeting with a {size}-byte payload")
        return Reply(t, 0)
    want = _RET.size + (_CPU_REPLY.size if t in (MsgType.ADD_CPU, MsgType.DEL_CPU) else 0)
    if size != want:
        raise UpcallProtocolError(f"{t.name} reply payload of {size} bytes, expected {want}")
    (ret,) = _RET.unpack_from(buf, HEADER.size)
    if ret > 0:
        raise UpcallProtocolError(f"{t.name} reply with positive status {ret} (0 or a negative errno)")
    cpu_index = _CPU_REPLY.unpack_from(buf, HEADER.size + _RET.size)[0] if size > _RET.size else 0
    return Reply(t, ret, cpu_index)


def connect_greeting() -> bytes:
    """What the guest sends first, right after it reads the service byte."""
    return _frame(MsgType.CONNECT, b"")
