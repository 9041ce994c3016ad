"""A minimal virtio driver for tests: lays out split rings in a GuestMemory and plays the guest.

It writes rings exactly as a Linux driver would (virtio 1.2, 2.7), so device
code is exercised through its real queue parser; hostile tests poke the raw
fields directly.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from katapy.vmm.memory import GuestMemory
from katapy.vmm.virtio.device import QueueState
from katapy.vmm.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE


@dataclass
class Buf:
    addr: int
    len: int
    write: bool


class DriverQueue:
    def __init__(self, mem: GuestMemory, ring_base: int, data_base: int, data_size: int, size: int = 16,
                 event_idx: bool = False):
        self.mem, self.size = mem, size
        self.desc = ring_base
        self.avail = ring_base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.avail_idx = 0
        self.used_seen = 0
        self.free = list(range(size))
        self.data_base, self.data_end = data_base, data_base + data_size
        self.next_data = data_base
        self.event_idx = event_idx
        self.bufs: dict[int, list[Buf]] = {}
        for off in range(self.used + 6 + 8 * size - ring_base):
            mem.write_u8(ring_base + off, 0)

    def state(self, max_size: int = 256) -> QueueState:
        return QueueState(max_size=max_size, size=self.size, ready=True, desc_table=self.desc,
                          avail_ring=self.avail, used_ring=self.used, event_idx=self.event_idx)

    def alloc(self, n: int) -> int:
        if self.next_data + n > self.data_end:
            self.next_data = self.data_base  # tests recycle the data area
        a = self.next_data
        self.next_data += (n + 15) & ~15
        return a

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add_chain(self, parts: list[tuple[bytes | int, bool]], indirect: bool = False) -> int:
        """parts: (data to be read by the device | size of a device-writable buffer, writable)."""
        bufs = []
        for data, wr in parts:
            if isinstance(data, int):
                a = self.alloc(data)
                bufs.append(Buf(a, data, True))
            else:
                a = self.alloc(len(data))
                self.mem.write(a, data)
                bufs.append(Buf(a, len(data), wr))
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, b in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(table, i, b.addr, b.len, (VIRTQ_DESC_F_WRITE if b.write else 0) |
                                (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1)
            head = self.free.pop(0)
            self.write_desc(self.desc, head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for i, b in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(self.desc, ids[i], b.addr, b.len, (VIRTQ_DESC_F_WRITE if b.write else 0) |
                                (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else ids[i + 1])
            head = ids[0]
        self.bufs[head] = bufs
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def take_used(self) -> list[tuple[int, int, bytes]]:
        """New used entries as (head, len, bytes written into the chain's writable buffers)."""
        out = []
        idx = self.mem.read_u16(self.used + 2)
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
            bufs = self.bufs.pop(head, [])
            data, left = b"", length
            for b in bufs:
                if b.write and left > 0:
                    take = min(b.len, left)
                    data += self.mem.read(b.addr, take)
                    left -= take
            # return the chain's descriptors to the free list
            self._free_chain(head, len([b for b in bufs]))
            out.append((head, length, data))
        return out

    def _free_chain(self, head: int, count: int) -> None:
        i = head
        for _ in range(count):
            self.free.append(i)
            flags, nxt = struct.unpack("<HH", self.mem.read(self.desc + 16 * i + 12, 4))
            if flags & VIRTQ_DESC_F_INDIRECT or not flags & VIRTQ_DESC_F_NEXT:
                break
            i = nxt


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
