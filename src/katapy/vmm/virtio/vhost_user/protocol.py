"""vhost-user wire format, back-end side (QEMU docs/interop/vhost-user.rst).

Every message is a 12-byte header ``u32 request, u32 flags, u32 size`` (native
little-endian) followed by ``size`` payload bytes; file descriptors ride along
as SCM_RIGHTS ancillary data on the header.  flags carries the version (0x1 in
bits 0-1), REPLY (bit 2) and NEED_REPLY (bit 3).
"""
from __future__ import annotations

import array
import enum
import os
import socket
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("<III")
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
MAX_PAYLOAD = 4096
MAX_FDS = 8
MAX_MEM_REGIONS = 8

#: VHOST_USER_F_PROTOCOL_FEATURES, offered in GET_FEATURES.
F_PROTOCOL_FEATURES = 30
#: VHOST_F_LOG_ALL: dirty logging for migration (never offered).
F_LOG_ALL = 26


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CONFIG = 9
    RESET_DEVICE = 13
    STATUS = 16


class ProtocolError(Exception):
    """The front end sent something that is not a valid vhost-user message."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def u64(self) -> int:
        if len(self.payload) < 8:
            raise ProtocolError(f"request {self.request}: payload of {len(self.payload)} bytes, need a u64")
        return struct.unpack_from("<Q", self.payload)[0]

    def vring_state(self) -> tuple[int, int]:
        if len(self.payload) < 8:
            raise ProtocolError(f"request {self.request}: short vring state")
        return struct.unpack_from("<II", self.payload)


@dataclass
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    @classmethod
    def parse(cls, payload: bytes) -> "VringAddr":
        if len(payload) < 40:
            raise ProtocolError("short vring address")
        return cls(*struct.unpack_from("<IIQQQQ", payload))


@dataclass
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


def parse_mem_table(payload: bytes) -> list[MemRegion]:
    if len(payload) < 8:
        raise ProtocolError("short memory table")
    n = struct.unpack_from("<I", payload)[0]
    if not 0 < n <= MAX_MEM_REGIONS or len(payload) < 8 + 32 * n:
        raise ProtocolError(f"memory table with {n} regions in {len(payload)} bytes")
    out = [MemRegion(*struct.unpack_from("<QQQQ", payload, 8 + 32 * i)) for i in range(n)]
    for r in out:
        if r.memory_size == 0 or r.guest_phys_addr + r.memory_size > 1 << 52:
            raise ProtocolError(f"invalid memory region {r}")
    return out


def recv_message(sock: socket.socket) -> Message | None:
    """Read one message (blocking, bounded by the socket timeout); None on a clean EOF."""
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    try:
        if not msg:
            return None
        if len(msg) < HEADER.size:
            msg += _recv_exact(sock, HEADER.size - len(msg))
        request, flags, size = HEADER.unpack(msg)
        if flags & FLAG_VERSION_MASK != VERSION:
            raise ProtocolError(f"unsupported vhost-user version in flags {flags:#x}")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
        payload = _recv_exact(sock, size) if size else b""
    except BaseException:
        for fd in fds:
            _close(fd)
        raise
    return Message(request, flags, payload, list(fds))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError("front end closed the socket mid-message")
        buf += chunk
    return bytes(buf)


def send_reply(sock: socket.socket, request: int, payload: bytes) -> None:
    sock.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
