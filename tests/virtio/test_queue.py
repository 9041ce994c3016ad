"""Split virtqueue parser: normal chains, indirect tables, event index, and a hostile driver."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from katapy.vmm.memory import GuestMemory
from katapy.vmm.virtio.queue import (
    ChainError, Queue, QueueBrokenError, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
)
from .driver import DriverQueue

RAM = 1 << 20


@pytest.fixture
def mem():
    with GuestMemory.create([(0, RAM)]) as m:
        yield m


def make(mem, size=16, event_idx=False):
    drv = DriverQueue(mem, 0x1000, 0x10000, 0x40000, size=size, event_idx=event_idx)
    return drv, Queue(mem, drv.state())


def test_direct_chain_read_and_write(mem):
    drv, q = make(mem)
    head = drv.add_chain([(b"hello ", False), (b"world", False), (8, True), (8, True)])
    chain = q.pop()
    assert chain.head == head
    assert chain.reader().read(100) == b"hello world"
    w = chain.writer()
    assert w.available() == 16
    assert w.write(b"0123456789abcdefXYZ") == 16
    q.add_used(chain.head, w.bytes_written)
    assert q.pop() is None
    assert drv.take_used() == [(head, 16, b"0123456789abcdef")]


def test_indirect_chain(mem):
    drv, q = make(mem)
    drv.add_chain([(b"abc", False), (b"def", False), (4, True)], indirect=True)
    chain = q.pop()
    assert chain.reader().read_exact(6) == b"abcdef"
    assert chain.writable_len == 4


def test_slices_are_zero_copy_views(mem):
    drv, q = make(mem)
    drv.add_chain([(b"xy", False), (3, True), (5, True)])
    chain = q.pop()
    views = chain.writer().slices(8)
    assert [len(v) for v in views] == [3, 5]
    views[1][:] = b"HELLO"
    for v in views:
        v.release()
    q.add_used(chain.head, 8)
    assert drv.take_used()[0][2].endswith(b"HELLO")


def test_descriptor_loop_fails_only_that_chain(mem):
    drv, q = make(mem, size=4)
    drv.write_desc(drv.desc, 0, 0x20000, 8, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(drv.desc, 1, 0x20000, 8, VIRTQ_DESC_F_NEXT, 0)
    drv.publish(0)
    with pytest.raises(ChainError) as e:
        q.pop()
    assert e.value.head == 0
    q.add_used(0, 0)
    drv.free = [2, 3]
    drv.add_chain([(b"ok", False)])
    assert q.pop().reader().read(2) == b"ok"


@pytest.mark.parametrize("addr,length", [(RAM - 4, 8), (RAM + 100, 1), (2**64 - 8, 16), (0, 2**32 - 1)])
def test_buffer_outside_ram(mem, addr, length):
    drv, q = make(mem)
    drv.write_desc(drv.desc, 0, addr, length, 0, 0)
    drv.publish(0)
    with pytest.raises(ChainError, match="outside guest RAM"):
        q.pop()


def test_head_index_out_of_range_breaks_queue(mem):
    drv, q = make(mem, size=8)
    drv.publish(9)
    with pytest.raises(QueueBrokenError):
        q.pop()


def test_avail_idx_jump_breaks_queue(mem):
    drv, q = make(mem, size=8)
    mem.write_u16(drv.avail + 2, 9)
    with pytest.raises(QueueBrokenError, match="ahead"):
        q.pop()


def test_next_out_of_range(mem):
    drv, q = make(mem, size=4)
    drv.write_desc(drv.desc, 0, 0x20000, 8, VIRTQ_DESC_F_NEXT, 7)
    drv.publish(0)
    with pytest.raises(ChainError, match="outside a 4-entry"):
        q.pop()


def test_nested_and_bad_indirect(mem):
    drv, q = make(mem)
    table = 0x30000
    drv.write_desc(table, 0, 0x31000, 16, VIRTQ_DESC_F_INDIRECT, 0)
    drv.write_desc(drv.desc, 0, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(0)
    with pytest.raises(ChainError, match="nested"):
        q.pop()
    drv.write_desc(drv.desc, 1, table, 15, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(1)
    with pytest.raises(ChainError, match="invalid length"):
        q.pop()
    drv.write_desc(drv.desc, 2, table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 3)
    drv.publish(2)
    with pytest.raises(ChainError, match="NEXT"):
        q.pop()


def test_indirect_loop(mem):
    drv, q = make(mem)
    table = 0x30000
    drv.write_desc(table, 0, 0x31000, 16, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(table, 1, 0x31000, 16, VIRTQ_DESC_F_NEXT, 0)
    drv.write_desc(drv.desc, 0, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(0)
    with pytest.raises(ChainError, match="loop"):
        q.pop()


def test_readable_after_writable_is_refused(mem):
    drv, q = make(mem)
    drv.write_desc(drv.desc, 0, 0x20000, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(drv.desc, 1, 0x20000, 8, 0, 0)
    drv.publish(0)
    with pytest.raises(ChainError, match="after a device-writable"):
        q.pop()


def test_rings_outside_ram_are_refused(mem):
    drv = DriverQueue(mem, 0x1000, 0x10000, 0x1000, size=16)
    st_ = drv.state()
    st_.used_ring = RAM - 8
    with pytest.raises(QueueBrokenError):
        Queue(mem, st_)
    st_ = drv.state()
    st_.size = 12
    with pytest.raises(QueueBrokenError, match="size"):
        Queue(mem, st_)


def test_event_idx_notification(mem):
    drv, q = make(mem, event_idx=True)
    for _ in range(3):
        drv.add_chain([(4, True)])
    # the driver asks for an interrupt only once used idx passes 2
    mem.write_u16(drv.avail + 4 + 2 * drv.size, 2)
    q.pop(); q.add_used(0, 0)
    assert q.needs_notification()  # first time: always
    q.pop(); q.add_used(1, 0)
    assert not q.needs_notification()  # used idx 2: not past used_event+1 yet
    q.pop(); q.add_used(2, 0)
    assert q.needs_notification()  # used idx 3 crosses used_event 2
    assert not q.enable_notification()
    assert mem.read_u16(drv.used + 4 + 8 * drv.size) == 3  # avail_event


def test_no_interrupt_flag_without_event_idx(mem):
    drv, q = make(mem)
    drv.add_chain([(4, True)])
    drv.add_chain([(4, True)])
    q.pop(); q.add_used(0, 4)
    mem.write_u16(drv.avail, 1)
    assert not q.needs_notification()
    mem.write_u16(drv.avail, 0)
    q.pop(); q.add_used(1, 4)
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing new since


desc_st = st.tuples(
    st.integers(0, RAM + 0x1000), st.integers(0, 0x10000),
    st.integers(0, 7), st.integers(0, 20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=st.lists(desc_st, min_size=8, max_size=8), heads=st.lists(st.integers(0, 10), min_size=1, max_size=10),
       avail_idx=st.integers(0, 0xFFFF), indirect=st.lists(desc_st, min_size=0, max_size=6))
def test_fuzz_rings_never_escape(mem, descs, heads, avail_idx, indirect):
    drv, q = make(mem, size=8)
    table = 0x30000
    for i, d in enumerate(indirect):
        drv.write_desc(table, i, *d)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        if flags & VIRTQ_DESC_F_INDIRECT and indirect and i % 2:
            addr, length = table, 16 * len(indirect)
        drv.write_desc(drv.desc, i, addr, length, flags, nxt)
    for h in heads:
        drv.publish(h)
    if avail_idx % 3 == 0:
        mem.write_u16(drv.avail + 2, avail_idx)
    for _ in range(12):
        try:
            chain = q.pop()
        except ChainError as e:
            q.add_used(e.head, 0)
            continue
        except QueueBrokenError:
            return
        if chain is None:
            return
        for a, n in chain.readable + chain.writable:
            assert 0 <= a and a + n <= RAM
        chain.reader().read(1 << 20)
        w = chain.writer()
        w.write(bytes(min(w.available(), 1 << 16)))
        q.add_used(chain.head, w.bytes_written)


def test_indirect_table_limits(mem):
    """An indirect table is bounded (MAX_INDIRECT_ENTRIES, 2.7.5.3.1), inside RAM, and only a chain's
    first and only descriptor (2.7.5.3.1: no NEXT with INDIRECT; the device sees one table per chain)."""
    from katapy.vmm.virtio.queue import MAX_INDIRECT_ENTRIES

    drv, q = make(mem)
    table = 0x30000
    drv.write_desc(drv.desc, 0, table, 16 * (MAX_INDIRECT_ENTRIES + 1), VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(0)
    with pytest.raises(ChainError, match="invalid length"):
        q.pop()
    drv.write_desc(drv.desc, 1, RAM - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(1)
    with pytest.raises(ChainError, match="outside guest RAM"):
        q.pop()
    drv.write_desc(table, 0, 0x31000, 8, 0, 0)
    drv.write_desc(drv.desc, 2, 0x20000, 8, VIRTQ_DESC_F_NEXT, 3)
    drv.write_desc(drv.desc, 3, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(2)
    with pytest.raises(ChainError, match="after direct"):
        q.pop()
    # a full-size table whose entries all chain into a loop is cut at its own length
    for i in range(MAX_INDIRECT_ENTRIES):
        drv.write_desc(table, i, 0x31000, 1, VIRTQ_DESC_F_NEXT, (i + 1) % MAX_INDIRECT_ENTRIES)
    drv.write_desc(drv.desc, 4, table, 16 * MAX_INDIRECT_ENTRIES, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(4)
    with pytest.raises(ChainError, match="loop"):
        q.pop()


def test_longest_direct_chain_is_the_table(mem):
    """A chain using every descriptor once is fine; one more step (a loop back to the head) is not."""
    drv, q = make(mem, size=8)
    for i in range(8):
        drv.write_desc(drv.desc, i, 0x20000 + 16 * i, 16, VIRTQ_DESC_F_NEXT if i < 7 else 0, i + 1)
    drv.publish(0)
    assert len(q.pop().readable) == 8
    drv.write_desc(drv.desc, 7, 0x20000, 16, VIRTQ_DESC_F_NEXT, 0)
    drv.publish(0)
    with pytest.raises(ChainError, match="loop"):
        q.pop()


def test_ring_indices_wrap_at_16_bits(mem):
    """Indices are free-running u16 (2.7.6, 2.7.8): the queue works across the wrap, and an avail.idx
    that moves backwards (as seen modulo 2^16, more than the queue size ahead) breaks it."""
    drv = DriverQueue(mem, 0x1000, 0x10000, 0x40000, size=8)
    st_ = drv.state()
    st_.next_avail = st_.next_used = 0xFFFE
    drv.avail_idx = drv.used_seen = 0xFFFE
    q = Queue(mem, st_)
    for n in range(4):
        head = drv.add_chain([(4, True)])
        chain = q.pop()
        assert chain.head == head
        q.add_used(chain.head, 4)
        assert [u[:2] for u in drv.take_used()] == [(head, 4)]
    assert q.next_avail == 2 and mem.read_u16(drv.used + 2) == 2
    mem.write_u16(drv.avail + 2, 1)  # backwards by one
    with pytest.raises(QueueBrokenError, match="ahead"):
        q.pop()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.binary(min_size=16 * 8, max_size=16 * 8), indirect=st.binary(max_size=16 * 24),
       ind_len=st.integers(0, 16 * 30), ring=st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8),
       start=st.integers(0, 0xFFFF), ahead=st.integers(0, 12))
def test_fuzz_raw_tables_raise_only_queue_errors(mem, table, indirect, ind_len, ring, start, ahead):
    """Random bytes as the descriptor table and an indirect table, random ring entries and indices:
    pop() returns a chain inside RAM or raises ChainError/QueueBrokenError, never anything else."""
    drv = DriverQueue(mem, 0x1000, 0x10000, 0x40000, size=8)
    st_ = drv.state()
    st_.next_avail = st_.next_used = start
    q = Queue(mem, st_)
    mem.write(drv.desc, table)
    ind_table = 0x30000
    mem.write(ind_table, indirect.ljust(16 * 30, b"\0"))
    # point the INDIRECT descriptors at the random table, with a random (often wrong) length
    for i in range(8):
        flags = mem.read_u16(drv.desc + 16 * i + 12)
        if flags & VIRTQ_DESC_F_INDIRECT and i % 2:
            mem.write(drv.desc + 16 * i, struct.pack("<QI", ind_table, ind_len))
    for i, head in enumerate(ring):
        mem.write_u16(drv.avail + 4 + 2 * i, head % 10 if head & 1 else head)
    mem.write_u16(drv.avail + 2, (start + ahead) & 0xFFFF)
    for _ in range(10):
        try:
            chain = q.pop()
        except ChainError as e:
            assert 0 <= e.head < 8
            q.add_used(e.head, 0)
            continue
        except QueueBrokenError:
            return
        if chain is None:
            assert ahead <= 8
            return
        for a, n in chain.readable + chain.writable:
            assert 0 <= a and a + n <= RAM
        assert len(chain.readable) + len(chain.writable) <= 8 + 30
        q.add_used(chain.head, 0)
