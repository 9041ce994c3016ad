"""Target ``queue``: split-virtqueue descriptor chains (katapy.vmm.virtio.queue).

Fuzzed: the queue set-up (size, ring addresses), descriptor tables (addresses
outside RAM or across the hole between regions, lengths, flags, loops, ``next``
out of range), indirect tables (nested, bad lengths, NEXT set), the available
ring (``idx`` too far ahead, heads out of range) and random buffer contents;
then every chain popped is read and written through its Reader and Writer.

Clean errors: :class:`QueueBrokenError` (the device goes DEVICE_NEEDS_RESET)
and :class:`ChainError` (that request fails).  Checked invariants: every
range of a popped chain lies inside guest RAM, readable ranges come before
writable ones, a chain holds no more descriptors than its table, and popping
is bounded by the queue size.
"""
from __future__ import annotations

from fuzz.common import HostileGuest, Input, Part, readable, writable
from katapy.vmm.virtio.queue import MAX_INDIRECT_ENTRIES, ChainError, Queue, QueueBrokenError


def _chains(inp: Input) -> list[list[Part]]:
    chains = []
    for _ in range(inp.u8() % 9):
        parts = []
        for _ in range(1 + inp.u8() % 4):
            if inp.one_in(2):
                parts.append(writable(inp.interesting_int(2)))
            else:
                parts.append(readable(inp.blob(48) or b"\0"))
        chains.append(parts)
    return chains


def fuzz_one(data: bytes) -> None:
    inp = Input(data)
    guest = HostileGuest(inp)
    state = guest.queue(0, _chains(inp), max_size=256)
    try:
        q = Queue(guest.mem, state)
    except QueueBrokenError:
        return
    popped = 0
    try:
        while popped <= q.size + 1:
            try:
                chain = q.pop()
            except ChainError as e:
                q.add_used(e.head, 0)
                popped += 1
                continue
            if chain is None:
                if q.enable_notification():
                    continue
                break
            popped += 1
            ranges = chain.readable + chain.writable
            assert len(ranges) <= max(q.size, MAX_INDIRECT_ENTRIES), "chain longer than any table"
            for addr, n in ranges:
                assert guest.mem.check_range(addr, n), f"chain range {addr:#x}+{n:#x} outside RAM"
            got = chain.reader().read(chain.readable_len)
            assert len(got) == chain.readable_len
            limit = inp.u16()
            assert chain.reader(limit).read(1 << 20) == got[:limit], "a limited reader read past its limit"
            w = chain.writer()
            w.write(bytes(min(chain.writable_len, 1 << 16)))
            q.add_used(chain.head, w.bytes_written)
        assert popped <= q.size + 1, "popped more chains than the queue holds"
        q.needs_notification()
    except QueueBrokenError:
        return
