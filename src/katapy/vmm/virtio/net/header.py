"""The virtio-net packet header (virtio 1.2, section 5.1.6 "Device Operation").

Every buffer on the receive and transmit queues starts with
``struct virtio_net_hdr``; with VIRTIO_F_VERSION_1 it always carries
``num_buffers``, so it is 12 bytes::

    u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
    le16 csum_start; le16 csum_offset; le16 num_buffers;

A driver that did not negotiate VERSION_1 (a legacy virtio-mmio front end,
such as QEMU's microvm default) and not MRG_RXBUF uses the 10-byte header
without ``num_buffers`` (5.1.6.1 "Legacy Interface: Device Operation").
The tap device is given the same size (TUNSETVNETHDRSZ), so a frame moves
between tap and ring with its header in place.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("<BBHHHHH")
HEADER_SIZE = HEADER.size  # 12
LEGACY_HEADER_SIZE = 10  # no num_buffers

# flags (5.1.6)
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
# gso_type (5.1.6)
VIRTIO_NET_HDR_GSO_NONE = 0

ETH_HEADER_LEN = 14
#: The largest frame katapy moves: a 64 KiB IP datagram plus its Ethernet header.
MAX_FRAME_LEN = 65535 + ETH_HEADER_LEN


@dataclass(frozen=True)
class NetHeader:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                           self.csum_offset, self.num_buffers)

    @classmethod
    def unpack(cls, raw: bytes) -> NetHeader:
        """From a 12-byte header, or a 10-byte legacy one (num_buffers reads as 0)."""
        if len(raw) < HEADER_SIZE:
            raw = bytes(raw[:LEGACY_HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
        return cls(*HEADER.unpack_from(raw))


def check_tx_header(hdr: NetHeader) -> str | None:
    """Why a driver's transmit header is unacceptable, or None.

    katapy offers no checksum or segmentation offload (VIRTIO_NET_F_CSUM and
    the GSO features are not offered), so a driver MUST send fully formed
    frames: gso_type NONE and no NEEDS_CSUM (5.1.6.2.1).
    """
    if hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE:
        return f"gso_type {hdr.gso_type} without a GSO feature negotiated"
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return "NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated"
    return None
