"""Target ``vsock``: virtio-vsock packets (katapy.vmm.virtio.vsock) through the real device and muxer.

Fuzzed: TX packet headers (source and destination cid, ports, ``len`` against
the chain and the 64 KiB limit, type, every op and unknown ones, SHUTDOWN
flags, ``buf_alloc`` / ``fwd_cnt`` credit), sequences of packets on the same
ports (REQUEST, RW, CREDIT_*, SHUTDOWN, RST), RX buffers too small for a
header, host clients sending ``CONNECT`` lines, all on hostile rings.  Host
listeners at ``<uds>_1024`` and ``<uds>_5000`` accept guest connections.

Clean outcomes: a packet dropped (PacketError), answered with RST or served,
DeviceError from activate, the device marking itself broken.  Checked: every
RX packet the device writes has a well-formed header addressed to the guest
from the host cid, with a ``len`` that matches what was written.
"""
from __future__ import annotations

import os
import socket
import tempfile

from fuzz.common import HostileGuest, Input, Part, RecordingInterrupt, StepLoop, eventfds, readable, writable
from katapy.vmm.virtio.device import DeviceError
from katapy.vmm.virtio.vsock import device as vsock_device
from katapy.vmm.virtio.vsock.packet import HDR_SIZE, VSOCK_HOST_CID, Header

GUEST_CID = 3
PORTS = (1024, 5000)
_state: dict[str, object] = {}


def _device() -> vsock_device.VsockDevice:
    if "dev" not in _state:
        d = tempfile.mkdtemp(prefix="katapy-fuzz-vsock-")
        uds = os.path.join(d, "vsock.sock")
        _state["dev"] = vsock_device.VsockDevice(GUEST_CID, uds)
        listeners = []
        for port in PORTS:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            s.bind(f"{uds}_{port}")
            s.listen(64)
            listeners.append(s)
        _state["listeners"] = listeners
        _state["uds"] = uds
        _state["kicks"] = eventfds(3)
    return _state["dev"]  # type: ignore[return-value]


def _packet(inp: Input) -> list[Part]:
    payload = inp.blob(32) if inp.one_in(2) else b""
    h = Header(
        inp.pick((GUEST_CID, GUEST_CID, GUEST_CID, VSOCK_HOST_CID, inp.u64())),
        inp.pick((VSOCK_HOST_CID, VSOCK_HOST_CID, GUEST_CID, inp.u64())),
        inp.pick((7, 8, 9, inp.u32())),
        inp.pick(PORTS + ((1 << 30) | 0, inp.u32())),
        len(payload) if not inp.one_in(8) else inp.interesting_int(4),
        inp.pick((1, 1, 1, 2, inp.u16())),
        inp.pick((1, 2, 3, 4, 5, 5, 5, 6, 7, 0, inp.u16())),
        inp.pick((0, 1, 2, 3, inp.u32())),
        inp.pick((1 << 18, 0, 64, inp.u32())),
        inp.pick((0, 0, inp.u32())),
    )
    raw = h.pack() + payload
    if inp.one_in(8):
        raw = raw[: inp.u8() % len(raw)]
    parts = [readable(raw or b"\0")]
    if inp.one_in(16):
        parts.append(writable(8))
    return parts


def _rx_buffer(inp: Input) -> list[Part]:
    parts = [writable(inp.pick((HDR_SIZE + 4096, HDR_SIZE, HDR_SIZE - 1, 60)))]
    if inp.one_in(8):
        parts.insert(0, readable(b"x"))
    return parts


def _check_rx(guest: HostileGuest) -> None:
    """Packets the device wrote into RX buffers carry the host's cid and an honest ``len``."""
    if not guest.honest:
        return
    for addr, n in guest.written.get(0, []):
        raw = guest.mem.read(addr, HDR_SIZE)
        if raw == bytes(HDR_SIZE):
            continue
        h = Header.unpack(raw)
        assert h.src_cid == VSOCK_HOST_CID and h.dst_cid == GUEST_CID, f"RX packet {h} not host -> guest"
        assert h.len <= n - HDR_SIZE, f"RX packet len {h.len} exceeds its {n}-byte buffer"


def fuzz_one(data: bytes) -> None:
    inp = Input(data)
    dev = _device()
    guest = HostileGuest(inp)
    clients = []
    for _ in range(inp.u8() % 3):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(_state["uds"])  # type: ignore[arg-type]
        c.setblocking(False)
        c.send(inp.pick((b"CONNECT 1024\n", b"CONNECT 5000\n", b"connect 99999999999\n", inp.blob(40))) or b"\n")
        clients.append(c)
    rx = guest.queue(0, [_rx_buffer(inp) for _ in range(inp.u8() % 5)])
    tx = guest.queue(1, [_packet(inp) for _ in range(inp.u8() % 8)])
    ev = guest.queue(2, [])
    loop, irq = StepLoop(), RecordingInterrupt()
    accepted: list[socket.socket] = []
    try:
        try:
            dev.activate(guest.mem, [rx, tx, ev], _state["kicks"], irq, loop)  # type: ignore[arg-type]
        except DeviceError:
            return
        for _ in range(3):  # host side: accept, CONNECT lines, stream data, then serve the queues again
            loop.poll_once()
            for lst in _state["listeners"]:  # type: ignore[attr-defined]
                try:
                    s, _ = lst.accept()
                except BlockingIOError:
                    continue
                s.setblocking(False)
                accepted.append(s)
                try:
                    s.send(inp.blob(16) or b"hi")
                except OSError:  # the device already reset this connection (a guest RST): the host's send fails
                    pass
            loop.run_pending()
            dev._process_tx()
            dev._process_rx()
        _check_rx(guest)
        dev.reset()
    finally:
        loop.close()
        for s in clients + accepted:
            s.close()
