"""Target ``net``: virtio-net headers and frames (katapy.vmm.virtio.net) over a fake tap.

The tap is a SOCK_SEQPACKET socketpair (one frame per read or write, as a tap
fd); the device code, header parsing and checks are the real ones.  Fuzzed:
the 12-byte and legacy 10-byte headers (``NetHeader.unpack``,
``check_tx_header``), transmit chains (header fields, GSO and checksum
requests, frames too short or longer than 64 KiB), receive chains (too small,
device-readable buffers) and the frames the host side delivers, all on hostile
rings.

Clean outcomes: a frame sent or dropped and counted, a chain completed empty,
DeviceError from activate, the device marking itself broken.  Checked: every
frame that reaches the tap is at least a header and an Ethernet header, its
header is zeroed, and it is no longer than the largest frame.
"""
from __future__ import annotations

import os
import socket
from unittest import mock

from fuzz.common import HostileGuest, Input, Part, RecordingInterrupt, StepLoop, eventfds, readable, writable
from katapy.vmm.virtio.device import VIRTIO_F_VERSION_1, DeviceError
from katapy.vmm.virtio.net import device as net_device
from katapy.vmm.virtio.net.header import (
    ETH_HEADER_LEN, HEADER_SIZE, LEGACY_HEADER_SIZE, MAX_FRAME_LEN, NetHeader, check_tx_header,
)
from katapy.vmm.virtio.net.tap import Tap

_state: dict[str, object] = {}


class _SocketTap(Tap):
    """A tap stand-in: the header size is recorded instead of set with TUNSETVNETHDRSZ."""

    def set_header_size(self, size: int) -> None:
        self.header_size = size


def _device() -> net_device.NetDevice:
    if "dev" not in _state:
        ours, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        host.setblocking(False)
        with mock.patch.object(Tap, "adopt", classmethod(lambda cls, fd: _SocketTap(fd, "fuzz0"))):
            _state["dev"] = net_device.NetDevice("fuzz0", "52:54:00:12:34:56", tap_fd=ours.detach())
        _state["host"] = host
        _state["kicks"] = eventfds(2)
    return _state["dev"]  # type: ignore[return-value]


def _tx_chain(inp: Input) -> list[Part]:
    hdr = NetHeader(inp.pick((0, 0, 1, 2, inp.u8())), inp.pick((0, 0, 1, 3, inp.u8())), inp.u16(), inp.u16(),
                    inp.u16(), inp.u16(), inp.u16()).pack()
    frame = inp.take(inp.pick((ETH_HEADER_LEN, 60, 13, 0, 200)))
    if inp.one_in(32):
        frame += bytes(MAX_FRAME_LEN)  # one past the largest frame with the header
    parts = [readable(hdr[: inp.pick((HEADER_SIZE, LEGACY_HEADER_SIZE, 4))])]
    if frame:
        parts.append(readable(frame))
    if inp.one_in(8):
        parts.append(writable(16))
    return parts


def _rx_chain(inp: Input) -> list[Part]:
    parts = [writable(inp.pick((1526, 64, 12, 1, inp.u16())))]
    if inp.one_in(8):
        parts.insert(0, readable(b"\0" * 12))
    return parts


def fuzz_one(data: bytes) -> None:
    inp = Input(data)
    # the header parser alone, on raw bytes of any length
    raw = inp.blob(16)
    check_tx_header(NetHeader.unpack(raw)) if len(raw) >= LEGACY_HEADER_SIZE else None

    dev = _device()
    host: socket.socket = _state["host"]  # type: ignore[assignment]
    guest = HostileGuest(inp)
    dev.ack_features(dev.avail_features() & ~(0 if inp.u8() & 1 else 1 << VIRTIO_F_VERSION_1))
    rx = guest.queue(0, [_rx_chain(inp) for _ in range(inp.u8() % 4)])
    tx = guest.queue(1, [_tx_chain(inp) for _ in range(inp.u8() % 5)])
    for _ in range(inp.u8() % 3):
        try:
            host.send(inp.take(inp.pick((HEADER_SIZE + 60, 5, 1500))) or b"\0")
        except BlockingIOError:
            break
    loop, irq = StepLoop(), RecordingInterrupt()
    try:
        try:
            dev.activate(guest.mem, [rx, tx], _state["kicks"], irq, loop)  # type: ignore[arg-type]
        except DeviceError:
            return
        loop.run_pending()
        dev.reset()
    finally:
        loop.close()
    hdr_len = dev._hdr
    while True:
        try:
            sent = host.recv(1 << 17)
        except BlockingIOError:
            break
        assert hdr_len + ETH_HEADER_LEN <= len(sent) <= hdr_len + MAX_FRAME_LEN, f"{len(sent)}-byte frame on the tap"
        assert sent[:hdr_len] == bytes(hdr_len), "a transmitted frame kept the guest's header"
    # frames the device kept for lack of a receive buffer are dropped with the case
    while True:
        try:
            os.read(dev.tap.fd, 1 << 17)
        except BlockingIOError:
            break
