"""Split virtqueues, device side (virtio 1.2, section 2.7).

The driver owns three areas in guest memory:

* the descriptor table: ``size`` entries of ``{le64 addr, le32 len, le16 flags, le16 next}``
  (2.7.5), 16-byte aligned;
* the available ring: ``le16 flags, le16 idx, le16 ring[size], le16 used_event`` (2.7.6);
* the used ring: ``le16 flags, le16 idx, {le32 id, le32 len} ring[size], le16 avail_event`` (2.7.8).

Everything in them is written by the guest, so every index, address and
length is checked before use: a ring-level impossibility (a head index out of
range, ``avail.idx`` moving more than ``size`` ahead, rings outside RAM) makes
the queue *broken* (:class:`QueueBrokenError`, a :class:`DeviceError`); a bad
chain (a loop, a descriptor outside RAM, a nested indirect table, readable
after writable) fails only that request (:class:`ChainError`), which the
device completes with zero length.  Guest memory is only touched through
:class:`~katapy.vmm.memory.GuestMemory`'s checked accessors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from katapy.vmm.barrier import full_barrier
from katapy.vmm.memory import GuestMemory, GuestMemoryError
from katapy.vmm.virtio.device import DeviceError, QueueState

# Descriptor flags (2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Available ring flags (2.7.7): the driver does not want interrupts.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
#: An indirect table may hold more entries than the queue (Linux allocates one per
#: scatter-gather element), but never more than this: bounded work per request.
MAX_INDIRECT_ENTRIES = 4096


class QueueBrokenError(DeviceError):
    """The driver corrupted the ring itself; the queue cannot be used any more."""


class ChainError(Exception):
    """One descriptor chain is malformed; the request fails, the queue goes on."""

    def __init__(self, head: int, reason: str):
        super().__init__(f"descriptor chain {head}: {reason}")
        self.head = head
        self.reason = reason


@dataclass(frozen=True)
class Descriptor:
    addr: int
    len: int
    flags: int
    next: int

    @property
    def is_write_only(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


@dataclass
class DescriptorChain:
    """A validated chain: device-readable ranges first, then device-writable ones."""

    mem: GuestMemory
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)  # (guest addr, len)
    writable: list[tuple[int, int]] = field(default_factory=list)

    def reader(self, limit: int | None = None) -> "Reader":
        """The device-readable bytes as one stream; with ``limit``, only the first ``limit`` of them
        (a request whose own header gives its length ends there, whatever the chain holds)."""
        if limit is None:
            return Reader(self.mem, self.readable)
        ranges = []
        for addr, n in self.readable:
            if limit <= 0:
                break
            ranges.append((addr, min(n, limit)))
            limit -= n
        return Reader(self.mem, ranges)

    def writer(self) -> "Writer":
        return Writer(self.mem, self.writable)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


class _Cursor:
    """A position in a list of guest ranges."""

    def __init__(self, mem: GuestMemory, ranges: list[tuple[int, int]]):
        self.mem = mem
        self._ranges = [(a, n) for a, n in ranges if n > 0]
        self._i = 0  # current range
        self._off = 0  # offset into it
        self.consumed = 0

    def available(self) -> int:
        return sum(n for _, n in self._ranges[self._i :]) - self._off

    def slices(self, length: int) -> list[memoryview]:
        """Up to ``length`` bytes as zero-copy views of guest RAM (for preadv/pwritev); consumed."""
        out: list[memoryview] = []
        while length > 0 and self._i < len(self._ranges):
            addr, n = self._ranges[self._i]
            take = min(n - self._off, length)
            out.append(self.mem.slice(addr + self._off, take))
            self._advance(take)
            length -= take
        return out

    def skip(self, length: int) -> int:
        done = 0
        while length > 0 and self._i < len(self._ranges):
            n = self._ranges[self._i][1]
            take = min(n - self._off, length)
            self._advance(take)
            length -= take
            done += take
        return done

    def _advance(self, take: int) -> None:
        self._off += take
        self.consumed += take
        if self._off == self._ranges[self._i][1]:
            self._i += 1
            self._off = 0


class Reader(_Cursor):
    """Reads the device-readable part of a chain as one byte stream."""

    def read(self, length: int) -> bytes:
        """Up to ``length`` bytes (fewer at the end of the chain)."""
        parts = []
        while length > 0 and self._i < len(self._ranges):
            addr, n = self._ranges[self._i]
            take = min(n - self._off, length)
            parts.append(self.mem.read(addr + self._off, take))
            self._advance(take)
            length -= take
        return b"".join(parts)

    def read_exact(self, length: int) -> bytes:
        data = self.read(length)
        if len(data) != length:
            raise EOFError(f"request needs {length} bytes, chain holds {len(data)}")
        return data


class Writer(_Cursor):
    """Writes the device-writable part of a chain as one byte stream."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much of ``data`` as fits; returns the count written."""
        view = memoryview(data)
        done = 0
        while done < len(view) and self._i < len(self._ranges):
            addr, n = self._ranges[self._i]
            take = min(n - self._off, len(view) - done)
            self.mem.write(addr + self._off, view[done : done + take])
            self._advance(take)
            done += take
        return done

    def write_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.write(data) != len(data):
            raise EOFError(f"reply of {len(data)} bytes does not fit the chain")

    @property
    def bytes_written(self) -> int:
        return self.consumed


class Queue:
    """The device's view of one split virtqueue (``QueueState`` holds what the driver set)."""

    def __init__(self, mem: GuestMemory, state: QueueState):
        self.mem = mem
        self.state = state
        self.size = state.size
        self._signalled_used: int | None = None
        self.validate()
        # each head's device-readable bytes, set when its chain is popped, counted when it is completed
        self._readable = [0] * self.size

    # -- layout ---------------------------------------------------------------
    def validate(self) -> None:
        """Check the driver's queue set-up (2.7: size a power of 2, alignment, areas inside RAM)."""
        s = self.state
        n = s.size
        if n == 0 or n > s.max_size or n & (n - 1) or n > 32768:
            raise QueueBrokenError(f"invalid queue size {n} (max {s.max_size})")
        checks = (
            ("descriptor table", s.desc_table, DESC_SIZE * n, 16),
            ("available ring", s.avail_ring, 6 + 2 * n, 2),
            ("used ring", s.used_ring, 6 + 8 * n, 4),
        )
        for name, addr, length, align in checks:
            if addr % align:
                raise QueueBrokenError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not self.mem.check_range(addr, length):
                raise QueueBrokenError(f"{name} at {addr:#x}+{length:#x} is outside guest RAM")

    @property
    def next_avail(self) -> int:
        return self.state.next_avail

    @property
    def next_used(self) -> int:
        return self.state.next_used

    def _avail_idx(self) -> int:
        return self.mem.read_u16(self.state.avail_ring + 2)

    # -- popping ------------------------------------------------------------
    def pending(self) -> int:
        """How many chains the driver has made available that we have not popped."""
        pending = (self._avail_idx() - self.state.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueBrokenError(f"avail.idx moved {pending} entries ahead of a {self.size}-entry queue")
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.  Raises ChainError (already consumed) or QueueBrokenError."""
        if self.pending() == 0:
            return None
        slot = self.state.next_avail % self.size
        head = self.mem.read_u16(self.state.avail_ring + 4 + 2 * slot)
        self.state.next_avail = (self.state.next_avail + 1) & 0xFFFF
        if head >= self.size:
            raise QueueBrokenError(f"available ring names descriptor {head} of a {self.size}-entry table")
        return self._walk(head)

    def pop_valid(self, log: object) -> DescriptorChain | None:
        """The next well-formed chain, re-enabling notifications when the ring looks empty.

        Malformed chains are logged and completed with zero length (the request fails, the
        queue goes on); QueueBrokenError still propagates.
        """
        while True:
            try:
                chain = self.pop()
            except ChainError as e:
                log.warning("malformed descriptor chain completed empty", error=str(e))  # type: ignore[attr-defined]
                self.add_used(e.head, 0)
                continue
            if chain is None and self.enable_notification():
                continue
            return chain

    def undo_pop(self) -> None:
        """Put the chain just popped back (the device found it had nothing to write)."""
        self.state.next_avail = (self.state.next_avail - 1) & 0xFFFF

    def _read_desc(self, table: int, index: int) -> Descriptor:
        base = table + DESC_SIZE * index
        raw = self.mem.read(base, DESC_SIZE)
        return Descriptor(
            int.from_bytes(raw[0:8], "little"),
            int.from_bytes(raw[8:12], "little"),
            int.from_bytes(raw[12:14], "little"),
            int.from_bytes(raw[14:16], "little"),
        )

    def _walk(self, head: int) -> DescriptorChain:
        chain = DescriptorChain(self.mem, head)
        self._readable[head] = readable = 0  # a malformed chain is completed with nothing read
        table, table_len, index = self.state.desc_table, self.size, head
        budget = self.size  # a chain never holds more descriptors than its table
        indirect = False
        while True:
            if budget == 0:
                raise ChainError(head, "chain is longer than its descriptor table (loop?)")
            budget -= 1
            try:
                d = self._read_desc(table, index)
            except GuestMemoryError as e:
                raise ChainError(head, f"descriptor outside guest RAM: {e}") from None
            if d.flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise ChainError(head, "nested indirect descriptor table")
                if d.flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "indirect descriptor with NEXT set")
                if chain.readable or chain.writable:
                    raise ChainError(head, "indirect descriptor after direct descriptors")
                if d.len == 0 or d.len % DESC_SIZE or d.len // DESC_SIZE > MAX_INDIRECT_ENTRIES:
                    raise ChainError(head, f"indirect table of invalid length {d.len}")
                if not self.mem.check_range(d.addr, d.len):
                    raise ChainError(head, f"indirect table {d.addr:#x}+{d.len:#x} outside guest RAM")
                indirect = True
                table, table_len, index = d.addr, d.len // DESC_SIZE, 0
                budget = table_len
                continue
            if not self.mem.check_range(d.addr, d.len):
                raise ChainError(head, f"buffer {d.addr:#x}+{d.len:#x} outside guest RAM")
            if d.is_write_only:
                chain.writable.append((d.addr, d.len))
            else:
                if chain.writable:
                    raise ChainError(head, "device-readable descriptor after a device-writable one")
                chain.readable.append((d.addr, d.len))
                readable += d.len
            if not d.flags & VIRTQ_DESC_F_NEXT:
                self._readable[head] = readable
                return chain
            if d.next >= table_len:
                raise ChainError(head, f"next index {d.next} outside a {table_len}-entry table")
            index = d.next

    # -- completing ---------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written (2.7.8.2), and count it
        (every device completes its chains here: the per-queue counters in QueueState)."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} out of range")
        s = self.state
        length &= 0xFFFFFFFF
        slot = s.next_used % self.size
        elem = s.used_ring + 4 + 8 * slot
        self.mem.write(elem, head.to_bytes(4, "little") + length.to_bytes(4, "little"))
        s.next_used = (s.next_used + 1) & 0xFFFF
        # x86 is TSO and CPython stores in program order: the element is visible before idx.
        self.mem.write_u16(s.used_ring + 2, s.next_used)
        s.requests += 1
        s.read_bytes += self._readable[head]
        s.written_bytes += length

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was added since the last one (2.7.10)."""
        new = self.state.next_used
        old = self._signalled_used
        if new == old:
            return False  # nothing added since the last interrupt
        self._signalled_used = new
        full_barrier()  # the used idx store must be visible before the driver's fields are read (2.7.10)
        if not self.state.event_idx:
            flags = self.mem.read_u16(self.state.avail_ring)
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        if old is None:
            return True
        used_event = self.mem.read_u16(self.state.avail_ring + 4 + 2 * self.size)
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF

    def enable_notification(self) -> bool:
        """Ask for a kick on the next buffer; True if buffers arrived meanwhile (check again)."""
        if self.state.event_idx:
            self.mem.write_u16(self.state.used_ring + 4 + 8 * self.size, self.state.next_avail)
        full_barrier()  # avail_event must be visible before avail idx is read again (2.7.10)
        return self.pending() > 0
