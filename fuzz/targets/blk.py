"""Target ``blk``: virtio-blk requests (katapy.vmm.virtio.blk) against a 32 KiB temp disk image.

Fuzzed: the negotiated features, request headers (every type and unknown ones,
reserved field, sectors at and past the capacity), payload lengths (whole and
partial sectors, wrong direction), the status byte (missing, longer),
DISCARD / WRITE_ZEROES segments (sector, count, flags), GET_ID buffers, all
carried by hostile rings (see fuzz.common.HostileGuest).

Clean outcomes: a request answered with a status byte, a chain completed
empty, DeviceError from activate (a queue the driver set up wrongly) or the
device marking itself broken (DEVICE_NEEDS_RESET).  Checked: the image never
changes size, and every used length fits the chain.
"""
from __future__ import annotations

import os
import tempfile

from fuzz.common import HostileGuest, Input, Part, RecordingInterrupt, StepLoop, eventfds, readable, writable
from katapy.vmm.virtio.blk import BlockDevice
from katapy.vmm.virtio.blk.request import HEADER, SEGMENT, RequestType
from katapy.vmm.virtio.device import DeviceError

SECTORS = 64
_TYPES = tuple(int(t) for t in RequestType) + (2, 3, 0xFFFFFFFF)
_state: dict[str, object] = {}


def _device() -> BlockDevice:
    if "dev" not in _state:
        d = tempfile.mkdtemp(prefix="katapy-fuzz-blk-")
        path = os.path.join(d, "disk.img")
        with open(path, "wb") as f:
            f.write(os.urandom(SECTORS * 512))
        _state["dev"] = BlockDevice(path)
        _state["path"] = path
        _state["kick"] = eventfds(1)
    return _state["dev"]  # type: ignore[return-value]


def _sector(inp: Input) -> int:
    return inp.pick((inp.u8() % SECTORS, SECTORS - 1, SECTORS, inp.u64(), (1 << 63) - 1))


def _request(inp: Input) -> list[Part]:
    rtype = inp.pick(_TYPES)
    parts = [readable(HEADER.pack(rtype, inp.interesting_int(4), _sector(inp)))]
    if inp.one_in(8):  # a header split over two descriptors, or cut short
        raw = parts[0].data
        cut = inp.u8() % len(raw)
        parts = [readable(raw[:cut] or b"\0"), readable(raw[cut:])] if inp.one_in(2) else [readable(raw[:cut] or b"\0")]
    for _ in range(inp.u8() % 3):
        if rtype in (RequestType.DISCARD, RequestType.WRITE_ZEROES) and not inp.one_in(4):
            segs = b"".join(SEGMENT.pack(_sector(inp), inp.interesting_int(4), inp.pick((0, 1, 2, inp.u32())))
                            for _ in range(1 + inp.u8() % 3))
            parts.append(readable(segs))
        elif inp.one_in(2):
            parts.append(writable(inp.pick((512, 1024, 20, 1, inp.u16()))))
        else:
            parts.append(readable(inp.take(inp.pick((512, 16, 1, 1024))) or bytes(512)))
    parts.append(writable(inp.pick((1, 1, 1, 2, 0))) if not inp.one_in(16) else readable(b"\0"))
    return [p for p in parts if p.data or p.write_len]


def fuzz_one(data: bytes) -> None:
    inp = Input(data)
    dev = _device()
    guest = HostileGuest(inp)
    dev.ack_features(dev.avail_features() & (inp.u64() if inp.one_in(4) else -1))
    chains = [_request(inp) for _ in range(1 + inp.u8() % 6)]
    state = guest.queue(0, chains, max_size=dev.queue_max_sizes[0])
    start = state.next_used
    loop, irq = StepLoop(), RecordingInterrupt()
    try:
        try:
            dev.activate(guest.mem, [state], _state["kick"], irq, loop)  # type: ignore[arg-type]
        except DeviceError:
            return
        loop.run_pending()
        used_idx = guest.mem.read_u16(state.used_ring + 2) if guest.mem.check_range(state.used_ring, 4) else 0
        completed = state.next_used != start  # used.idx is only written when a chain completes
        assert dev.broken or not completed or used_idx == state.next_used, \
            "used.idx does not match what the device completed"
        dev.reset()
    finally:
        loop.close()
    assert os.path.getsize(_state["path"]) == SECTORS * 512, "the disk image changed size"
