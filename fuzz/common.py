"""What the virtio fuzz targets share: a byte consumer, a guest that lays out hostile rings, a manual loop.

:class:`Input` turns the fuzzer's bytes into decisions (an exhausted input
reads as zeros, so every prefix of an input is itself a valid input).
:class:`HostileGuest` plays a virtio driver over a :class:`GuestMemory` of two
regions with a hole between them: it writes the chains a target asks for the
way a Linux driver would (direct or through an indirect table), then corrupts
descriptor and ring fields at an input-chosen rate (addresses outside RAM or
straddling the hole, lengths past the end, loops, ``next`` out of range,
nested indirect tables, ``avail.idx`` far ahead, heads out of range).
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog

from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory
from katapy.vmm.virtio.device import Interrupt, QueueState
from katapy.vmm.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

DESC = struct.Struct("<QIHH")

# Guest RAM: region A [0, 128 KiB) and region B [256 KiB, 320 KiB); the hole between is not RAM.
REGION_A = (0x0, 0x20000)
REGION_B = (0x40000, 0x10000)
RING_BASE = 0x0  # queue i: descriptor table at i*0x1000, avail at +0x400, used at +0x800
INDIRECT_BASE = 0x3000  # indirect tables: 0x400 bytes (64 entries) each, four of them
DATA_AREAS = ((0x4000, 0x20000), (0x40000, 0x50000))
MAX_QUEUE = 64


class Input:
    """Decisions read from fuzz bytes, little-endian; past the end everything reads as zero."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return max(0, len(self.data) - self.pos)

    def uint(self, nbytes: int) -> int:
        raw = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(raw, "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        return self.u16() % n if n > 0 else 0

    def pick(self, choices):  # type: ignore[no-untyped-def]
        return choices[self.u8() % len(choices)]

    def one_in(self, n: int) -> bool:
        """True with probability 1/n (never for n <= 0)."""
        return n > 0 and self.u8() % n == 0

    def take(self, n: int) -> bytes:
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw

    def blob(self, limit: int = 64) -> bytes:
        """A length-prefixed run of bytes (at most ``limit``)."""
        return self.take(self.u8() % (limit + 1))

    def interesting_int(self, nbytes: int) -> int:
        """Mostly small values and boundaries, sometimes anything that fits."""
        top = (1 << (8 * nbytes)) - 1
        kind = self.u8() % 8
        if kind < 4:
            return self.u8()
        if kind == 4:
            return self.pick((0, 1, top, top - 1, top >> 1, (top >> 1) + 1))
        return self.uint(nbytes)


class RecordingInterrupt(Interrupt):
    """Counts what a device signalled; DEVICE_NEEDS_RESET is a clean outcome for a hostile ring."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self.config_changes = 0
        self.needs_reset: list[str] = []

    def signal_used_queue(self, queue_index: int) -> None:
        self.used.append(queue_index)

    def signal_config_change(self) -> None:
        self.config_changes += 1

    def signal_needs_reset(self, reason: str) -> None:
        self.needs_reset.append(reason)


class StepLoop(EventLoop):
    """An EventLoop that is never started: ``call_soon`` work is run by :meth:`run_pending`."""

    def __init__(self) -> None:
        super().__init__(name="fuzz")
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.soon.append(fn)

    def run_pending(self, limit: int = 64) -> None:
        """Run queued callbacks, at most ``limit`` (a device that re-schedules forever is bounded)."""
        for _ in range(limit):
            if not self.soon:
                return
            self.soon.pop(0)()
        self.soon.clear()

    def poll_once(self) -> None:
        """Run the callbacks of the fds that are ready now (accepts, socket data), once each."""
        for fd, events in self._ep.poll(0):
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(fd, events)


@dataclass
class Part:
    """One buffer of a chain: bytes the device reads, or the size of a buffer it writes."""

    data: bytes = b""
    write_len: int = 0

    @property
    def writable(self) -> bool:
        return not self.data and self.write_len > 0


def readable(data: bytes) -> Part:
    return Part(data=data)


def writable(length: int) -> Part:
    return Part(write_len=length)


class HostileGuest:
    """Lays out split rings in one shared GuestMemory and fills them with chains, then corrupts them."""

    _mem: GuestMemory | None = None

    @classmethod
    def memory(cls) -> GuestMemory:
        if cls._mem is None:
            cls._mem = GuestMemory.create([REGION_A, REGION_B])
        return cls._mem

    def __init__(self, inp: Input):
        self.inp = inp
        self.mem = self.memory()
        for r in self.mem.regions:  # every case starts from zeroed RAM
            r.mapping[0 : r.size] = bytes(r.size)
        self._area, self._next = 0, DATA_AREAS[0][0]
        self._tables = 0
        self.wrapped = False  # the data area was reused: a buffer may overlap an older one
        #: per queue index, the (addr, len) of each chain's device-writable buffers, as laid out
        self.written: dict[int, list[tuple[int, int]]] = {}
        self.rate = inp.pick((0, 0, 64, 16, 4, 2))  # corrupt a field one time in `rate` (0: never)

    # -- raw placement -----------------------------------------------------------
    def alloc(self, n: int) -> int:
        """Guest RAM for an n-byte buffer, 16-aligned; wraps around (old buffers are reused)."""
        n = max(n, 1)
        start, end = DATA_AREAS[self._area]
        if self._next + n > end:
            self.wrapped = True
            self._area = (self._area + 1) % len(DATA_AREAS)
            start, end = DATA_AREAS[self._area]
            self._next = start
            if n > end - start:
                n = end - start
        addr = self._next
        self._next += (n + 15) & ~15
        return addr

    @property
    def honest(self) -> bool:
        """Nothing was corrupted and no buffer overlaps another: the rings are what a driver writes."""
        return self.rate == 0 and not self.wrapped

    def _corrupt(self) -> bool:
        return self.inp.one_in(self.rate)

    def _bad_addr(self, addr: int, length: int) -> int:
        inp = self.inp
        return inp.pick((
            REGION_A[1] - max(length // 2, 1),  # runs past the end of region A into the hole
            REGION_B[0] - 8,  # starts in the hole
            REGION_B[0] + REGION_B[1] - 1,  # the last byte of RAM
            addr + 1,  # misaligned
            (1 << 64) - 16,
            inp.u64(),
            inp.u32(),
        ))

    def _desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int, table_len: int) -> None:
        inp = self.inp
        if self._corrupt():
            addr = self._bad_addr(addr, length)
        if self._corrupt():
            length = inp.pick((0, length + 1, 0xFFFFFFFF, inp.u32(), 1 << 20))
        if self._corrupt():
            flags ^= inp.pick((VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT, inp.u16()))
        if self._corrupt():
            nxt = inp.pick((i, 0, table_len, table_len - 1, inp.u16(), inp.u8()))  # loops, out of range
        self.mem.write(table + DESC.size * i, DESC.pack(addr & (1 << 64) - 1, length & 0xFFFFFFFF,
                                                         flags & 0xFFFF, nxt & 0xFFFF))

    def _buffers(self, parts: list[Part]) -> list[tuple[int, int, int]]:
        out = []
        for p in parts:
            if p.writable:
                out.append((self.alloc(p.write_len), p.write_len, VIRTQ_DESC_F_WRITE))
            else:
                addr = self.alloc(len(p.data))
                self.mem.write(addr, p.data[: DATA_AREAS[self._area][1] - addr])
                out.append((addr, len(p.data), 0))
        return out

    # -- queues -------------------------------------------------------------------
    def queue(self, index: int, chains: list[list[Part]], max_size: int = 1024) -> QueueState:
        """Queue ``index`` holding ``chains`` (made available in order), corrupted at the input's rate."""
        inp = self.inp
        size = MAX_QUEUE >> inp.u8() % 7  # 64 .. 1
        while size < len(chains) and size < MAX_QUEUE:
            size <<= 1
        base = RING_BASE + 0x1000 * index
        desc, avail, used = base, base + 0x400, base + 0x800
        state = QueueState(max_size=max_size, size=size, ready=True, desc_table=desc, avail_ring=avail,
                           used_ring=used)
        if self._corrupt():
            state.size = inp.pick((0, 3, size * 2, 1 << 15, 1 << 16, inp.u16()))
        if self._corrupt():
            which = inp.u8() % 3
            bad = self._bad_addr((desc, avail, used)[which], 16 * size)
            if which == 0:
                state.desc_table = bad
            elif which == 1:
                state.avail_ring = bad
            else:
                state.used_ring = bad
        start = inp.u16() if self._corrupt() else 0
        state.next_avail = state.next_used = start
        free = list(range(size))
        heads = []
        for parts in chains:
            if not free or not parts:
                break
            bufs = self._buffers(parts)
            self.written.setdefault(index, []).extend((a, n) for a, n, f in bufs if f & VIRTQ_DESC_F_WRITE)
            if inp.one_in(3) and self._tables < 4:  # through an indirect table (2.7.5.3)
                table = INDIRECT_BASE + 0x400 * self._tables
                self._tables += 1
                for i, (a, n, f) in enumerate(bufs[:64]):
                    last = i == len(bufs) - 1
                    self._desc(table, i, a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), i + 1, len(bufs))
                head = free.pop(0)
                self._desc(desc, head, table, DESC.size * len(bufs), VIRTQ_DESC_F_INDIRECT, 0, size)
            else:
                ids = [free.pop(0) for _ in bufs[: len(free)]]
                for k, i in enumerate(ids):
                    last = k == len(ids) - 1
                    self._desc(desc, i, *bufs[k][:2], bufs[k][2] | (0 if last else VIRTQ_DESC_F_NEXT),
                               0 if last else ids[k + 1], size)
                head = ids[0]
            heads.append(head)
        for k, head in enumerate(heads):
            if self._corrupt():
                head = inp.pick((size, 0xFFFF, inp.u16()))
            self.mem.write_u16(avail + 4 + 2 * ((start + k) % size), head)
        idx = (start + len(heads)) & 0xFFFF
        if self._corrupt():
            idx = inp.pick((start + size + 1, start - 1, inp.u16())) & 0xFFFF
        self.mem.write_u16(avail, inp.u8() & 1)  # flags: NO_INTERRUPT or not
        self.mem.write_u16(avail + 2, idx)
        self.mem.write_u16(avail + 4 + 2 * size, inp.u16())  # used_event
        return state


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Hang(Exception):
    """One case ran past its time bound."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the case if it runs longer than ``seconds`` (a SIGALRM timer)."""

    def fire(signum: int, frame: object) -> None:
        raise Hang(f"case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def file_size_bound(limit: int) -> Iterator[None]:
    """Files this process writes cannot grow past ``limit`` bytes (EFBIG instead of a full disk)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


_QUIET = {"wrapper_class": structlog.make_filtering_bound_logger(logging.CRITICAL)}


def _module_loggers() -> list[tuple[object, object]]:
    """Every katapy module's ``_log`` (bound at import, so later structlog configuration misses it)."""
    return [(m, m._log) for name, m in list(sys.modules.items())
            if name.startswith("katapy.") and m is not None and hasattr(m, "_log")]


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Drop katapy's structured logs (a hostile guest makes every device warn on every case)."""
    saved = structlog.get_config()
    structlog.configure(**_QUIET)
    loggers = _module_loggers()
    for m, _ in loggers:
        m._log = structlog.get_logger().bind()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m, old in loggers:
            m._log = old  # type: ignore[attr-defined]
        structlog.configure(**saved)


def silence_logs() -> None:
    """:func:`quiet_logs` for the rest of the process (the fuzz runner's workers)."""
    structlog.configure(**_QUIET)
    logging.disable(logging.CRITICAL)
    for m, _ in _module_loggers():
        m._log = structlog.get_logger().bind()  # type: ignore[attr-defined]
