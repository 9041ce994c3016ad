"""virtio-vsock packets (virtio 1.2, section 5.10.6).

``struct virtio_vsock_hdr`` is 44 packed little-endian bytes::

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port;
    le32 len; le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;

A packet is carried by one descriptor chain: the header, then ``len`` payload
bytes.  Linux before 6.2 posts RX buffers as two descriptors (header, data),
6.2+ as one; treating the chain as a byte stream handles both.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from katapy.vmm.virtio.queue import DescriptorChain

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size  # 44
assert HDR_SIZE == 44

VSOCK_HOST_CID = 2
#: The largest payload either side puts in one packet (Linux VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PKT_PAYLOAD = 64 * 1024

TYPE_STREAM = 1
TYPE_SEQPACKET = 2

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
KNOWN_OPS = frozenset(range(1, 8))

#: SHUTDOWN flags: the sender will receive no more / send no more (sticky).
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = 3


class PacketError(Exception):
    """A TX chain from the guest is not a well-formed vsock packet."""


@dataclass
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int = 0
    type: int = TYPE_STREAM
    op: int = OP_INVALID
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
                        self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, raw: bytes) -> "Header":
        return cls(*HDR.unpack(raw))


@dataclass
class Packet:
    hdr: Header
    payload: bytes = b""


def parse_tx(chain: DescriptorChain) -> Packet:
    """Read a guest->host packet; every length is checked against the chain and MAX_PKT_PAYLOAD."""
    if chain.writable:
        # TX chains are device-readable only (5.10.6.4); tolerate nothing else.
        raise PacketError("TX chain has device-writable descriptors")
    r = chain.reader()
    total = r.available()
    if total < HDR_SIZE:
        raise PacketError(f"TX chain of {total} bytes is shorter than the 44-byte header")
    hdr = Header.unpack(r.read_exact(HDR_SIZE))
    if hdr.len > MAX_PKT_PAYLOAD:
        raise PacketError(f"payload length {hdr.len} exceeds {MAX_PKT_PAYLOAD}")
    if hdr.len > total - HDR_SIZE:
        raise PacketError(f"payload length {hdr.len} exceeds the {total - HDR_SIZE} bytes in the chain")
    payload = r.read_exact(hdr.len) if hdr.op == OP_RW else b""
    return Packet(hdr, payload)


def rx_capacity(chain: DescriptorChain) -> int:
    """Payload bytes an RX chain can hold after the header (-1 if it cannot hold a header)."""
    if chain.readable:
        return -1
    return chain.writable_len - HDR_SIZE
