"""virtio-mmio register semantics (virtio 1.2, 4.2.2-4.2.3) without a VM: the transport as a bus device."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory
from katapy.vmm.virtio import mmio
from katapy.vmm.virtio.device import VIRTIO_F_EVENT_IDX
from tests.vmm.recording_device import RecordingDevice


@pytest.fixture
def transport():
    mem = GuestMemory.create([(0, 1 << 20)])
    loop = EventLoop()
    irqs = []
    dev = RecordingDevice()
    t = mmio.MmioTransport(dev, mem, loop, lambda: irqs.append(1))
    t.irqs = irqs
    yield t
    t.close()
    loop.close()
    mem.close()


def rd(t, off):
    return struct.unpack("<I", t.read(off, 4))[0]


def wr(t, off, v):
    t.write(off, struct.pack("<I", v))


def negotiate(t, features_hi=1, features_lo=0):
    wr(t, mmio.STATUS, 1)
    wr(t, mmio.STATUS, 3)
    if features_lo:
        wr(t, mmio.DRIVER_FEATURES_SEL, 0)
        wr(t, mmio.DRIVER_FEATURES, features_lo)
    wr(t, mmio.DRIVER_FEATURES_SEL, 1)
    wr(t, mmio.DRIVER_FEATURES, features_hi)
    wr(t, mmio.STATUS, 0xB)


def setup_queue(t, q=0, size=16, desc=0x1000, avail=0x2000, used=0x3000):
    wr(t, mmio.QUEUE_SEL, q)
    wr(t, mmio.QUEUE_NUM, size)
    wr(t, mmio.QUEUE_DESC_LOW, desc)
    wr(t, mmio.QUEUE_DRIVER_LOW, avail)
    wr(t, mmio.QUEUE_DEVICE_LOW, used)
    wr(t, mmio.QUEUE_READY, 1)


def test_identity_registers(transport):
    assert rd(transport, mmio.MAGIC_VALUE) == 0x74726976
    assert rd(transport, mmio.VERSION) == 2
    assert rd(transport, mmio.DEVICE_ID) == RecordingDevice.device_type
    assert transport.read(mmio.MAGIC_VALUE, 2) == b"\0\0"  # sub-word register read: zeros
    assert transport.read(mmio.CONFIG, 4) == b"KATA"
    assert transport.read(mmio.CONFIG + 0x800, 4) == b"\0\0\0\0"  # past the config space


def test_features_ok_needs_version_1_and_offered_features(transport):
    negotiate(transport, features_hi=0)
    assert rd(transport, mmio.STATUS) == 3  # FEATURES_OK refused
    wr(transport, mmio.STATUS, 0)
    wr(transport, mmio.STATUS, 1)
    wr(transport, mmio.STATUS, 3)
    wr(transport, mmio.DRIVER_FEATURES_SEL, 0)
    wr(transport, mmio.DRIVER_FEATURES, 1 << 5)  # never offered
    wr(transport, mmio.DRIVER_FEATURES_SEL, 1)
    wr(transport, mmio.DRIVER_FEATURES, 1)
    wr(transport, mmio.STATUS, 0xB)
    assert rd(transport, mmio.STATUS) == 3
    wr(transport, mmio.STATUS, 0)
    negotiate(transport)
    assert rd(transport, mmio.STATUS) == 0xB
    assert transport.device.acked_features == 1 << 32


def test_queue_size_rules(transport):
    negotiate(transport)
    wr(transport, mmio.QUEUE_SEL, 0)
    assert rd(transport, mmio.QUEUE_NUM_MAX) == 256
    for bad in (0, 3, 100, 512):
        wr(transport, mmio.QUEUE_NUM, bad)
        assert transport.queues[0].size == 0
    wr(transport, mmio.QUEUE_READY, 1)
    assert rd(transport, mmio.QUEUE_READY) == 0  # no size yet
    wr(transport, mmio.QUEUE_SEL, 9)
    assert rd(transport, mmio.QUEUE_NUM_MAX) == 0  # no such queue
    wr(transport, mmio.QUEUE_NUM, 8)  # ignored, no crash


def test_activation_and_reset(transport):
    negotiate(transport)
    setup_queue(transport)
    wr(transport, mmio.STATUS, 0xF)
    assert rd(transport, mmio.STATUS) == 0xF
    assert transport.device.activations == [[(16, 0x1000, 0x2000, 0x3000), (0, 0, 0, 0)]]
    wr(transport, mmio.QUEUE_NUM, 32)  # after DRIVER_OK: ignored
    assert transport.queues[0].size == 16
    transport.interrupt.signal_used_queue(0)
    assert rd(transport, mmio.INTERRUPT_STATUS) == 1 and transport.irqs
    wr(transport, mmio.INTERRUPT_ACK, 1)
    assert rd(transport, mmio.INTERRUPT_STATUS) == 0
    wr(transport, mmio.STATUS, 0)
    assert transport.device.resets == 1
    assert rd(transport, mmio.STATUS) == 0 and transport.queues[0].size == 0
    for _ in range(100):  # reset storm: harmless, and no extra device resets
        wr(transport, mmio.STATUS, 0)
    assert transport.device.resets == 1


@pytest.mark.parametrize("desc,avail,used", [
    (0xFFFF0000, 0x2000, 0x3000),  # outside RAM
    (0x1008, 0x2000, 0x3000),  # misaligned descriptor table
    (0x1000, 0x2000, (1 << 20) - 8),  # used ring runs off the end of RAM
])
def test_bad_queue_addresses_set_device_needs_reset(transport, desc, avail, used):
    negotiate(transport)
    setup_queue(transport, desc=desc, avail=avail, used=used)
    wr(transport, mmio.STATUS, 0xF)
    status = rd(transport, mmio.STATUS)
    assert status & mmio.DEVICE_NEEDS_RESET
    assert not transport.device.activations
    assert rd(transport, mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG_CHANGE
    wr(transport, mmio.STATUS, 0)
    assert rd(transport, mmio.STATUS) == 0


def test_failing_activation_sets_device_needs_reset(transport):
    transport.device.fail_activate = True
    negotiate(transport)
    setup_queue(transport)
    wr(transport, mmio.STATUS, 0xF)
    assert rd(transport, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET


@pytest.mark.parametrize("fail", [False, True])
def test_activation_and_reset_run_on_the_device_loop_thread(transport, fail):
    """The driver's status writes arrive on a vCPU thread; the device's activation (which processes
    its queues at once) and reset run on the loop thread that runs its kick callbacks, so no two
    threads ever work one queue."""
    import threading

    transport.device.fail_activate = fail
    transport.loop.start()
    seen: dict[str, int] = {}

    def vcpu() -> None:
        negotiate(transport)
        setup_queue(transport)
        wr(transport, mmio.STATUS, 0xF)
        seen["status"] = rd(transport, mmio.STATUS)
        wr(transport, mmio.STATUS, 0)

    t = threading.Thread(target=vcpu, name="katapy-vcpu0")
    t.start()
    t.join(10)
    assert not t.is_alive()
    if fail:
        assert seen["status"] & mmio.DEVICE_NEEDS_RESET and transport.device.threads == []
    else:
        assert seen["status"] == 0xF
        assert transport.device.threads == [("activate", transport.loop.name), ("reset", transport.loop.name)]


def test_status_bits_out_of_order_are_refused(transport):
    wr(transport, mmio.STATUS, mmio.DRIVER_OK)
    assert rd(transport, mmio.STATUS) == 0
    wr(transport, mmio.STATUS, 1)
    wr(transport, mmio.STATUS, 1 | mmio.FEATURES_OK)
    assert rd(transport, mmio.STATUS) == 1
    wr(transport, mmio.STATUS, 1 | 0x20)  # unknown bit
    assert rd(transport, mmio.STATUS) == 1


def _wait(cond, timeout=5.0):
    import time

    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_ring_corrupted_at_run_time_sets_device_needs_reset(tmp_path):
    """A driver that corrupts a live ring (here avail.idx jumping past the queue size, 2.7.13.3)
    breaks the device: the transport shows DEVICE_NEEDS_RESET with a configuration-change
    interrupt (2.1.2, 4.2.2), the device loop goes on, and a reset brings the device back."""
    from katapy.vmm.virtio.blk import BlockDevice
    from katapy.vmm.virtio.blk.request import HEADER, RequestType, Status
    from tests.virtio.driver import DriverQueue

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * 512))
    mem = GuestMemory.create([(0, 1 << 20)])
    loop = EventLoop()
    irqs: list[int] = []
    t = mmio.MmioTransport(BlockDevice(disk), mem, loop, lambda: irqs.append(1))
    loop.start()
    try:
        def start() -> DriverQueue:
            drv = DriverQueue(mem, 0x1000, 0x10000, 0x10000, size=16)
            negotiate(t)
            setup_queue(t, size=16, desc=drv.desc, avail=drv.avail, used=drv.used)
            wr(t, mmio.STATUS, 0xF)
            assert rd(t, mmio.STATUS) == 0xF
            return drv

        drv = start()
        generation = rd(t, mmio.CONFIG_GENERATION)
        mem.write_u16(drv.avail + 2, 100)  # 100 new entries in a 16-entry ring
        wr(t, mmio.QUEUE_NOTIFY, 0)
        assert _wait(lambda: rd(t, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET), "no DEVICE_NEEDS_RESET"
        assert rd(t, mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG_CHANGE and irqs
        assert rd(t, mmio.CONFIG_GENERATION) != generation
        # the driver resets and starts again: the device serves requests
        wr(t, mmio.STATUS, 0)
        drv = start()
        head = drv.add_chain([(HEADER.pack(RequestType.GET_ID, 0, 0), False), (20, True), (1, True)])
        wr(t, mmio.QUEUE_NOTIFY, 0)
        assert _wait(lambda: mem.read_u16(drv.used + 2) == 1)
        (used_head, length, data), = drv.take_used()
        assert (used_head, length, data[20]) == (head, 21, Status.OK)
        assert rd(t, mmio.STATUS) == 0xF
    finally:
        loop.stop()
        t.close()
        loop.close()
        mem.close()


@pytest.mark.parametrize("kind", ["fs", "vsock"])
def test_other_devices_broken_at_run_time_set_device_needs_reset(tmp_path, kind):
    """The same for virtio-fs (request queue 1) and virtio-vsock (tx queue 1): every queue set up,
    one corrupted after DRIVER_OK."""
    from tests.virtio.driver import DriverQueue

    if kind == "fs":
        from katapy.vmm.virtio.fs import FsDevice

        (tmp_path / "share").mkdir()
        dev = FsDevice("t", tmp_path / "share")
    else:
        from katapy.vmm.virtio.vsock import VsockDevice

        dev = VsockDevice(3, tmp_path / "vsock.sock")
    mem = GuestMemory.create([(0, 1 << 20)])
    loop = EventLoop()
    t = mmio.MmioTransport(dev, mem, loop, lambda: None)
    loop.start()
    try:
        def start() -> list[DriverQueue]:
            negotiate(t)
            drvs = []
            for i in range(len(dev.queue_max_sizes)):
                drv = DriverQueue(mem, 0x1000 + 0x1000 * i, 0x10000, 0x10000, size=16)
                setup_queue(t, q=i, size=16, desc=drv.desc, avail=drv.avail, used=drv.used)
                drvs.append(drv)
            wr(t, mmio.STATUS, 0xF)
            assert rd(t, mmio.STATUS) == 0xF
            return drvs

        drvs = start()
        mem.write_u16(drvs[1].avail + 2, 0x8000)
        wr(t, mmio.QUEUE_NOTIFY, 1)
        assert _wait(lambda: rd(t, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET), "no DEVICE_NEEDS_RESET"
        assert rd(t, mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG_CHANGE
        wr(t, mmio.STATUS, 0)
        start()
        assert not dev.broken
    finally:
        loop.stop()
        t.close()
        loop.close()
        mem.close()


def test_odd_register_accesses_are_harmless(transport):
    """Registers are 32-bit aligned words (4.2.2.2): other widths and offsets read zeros and writes
    are dropped; config-space accesses past the window or of odd widths too."""
    negotiate(transport)
    for off, width in ((mmio.STATUS, 1), (mmio.STATUS, 2), (mmio.STATUS, 8), (mmio.STATUS + 1, 4)):
        transport.write(off, b"\xff" * width)
        assert transport.read(off, width) == bytes(width)
    assert rd(transport, mmio.STATUS) == 0xB
    transport.write(mmio.CONFIG + 0xF00 - 2, b"\xff" * 8)  # runs off the window: dropped
    transport.write(mmio.CONFIG, b"\xff" * 3)  # 3 bytes: not an access width
    assert transport.read(mmio.CONFIG, 8) == b"KATAPYCF"
    assert transport.read(mmio.CONFIG, 3) == bytes(3)
    wr(transport, mmio.DEVICE_FEATURES_SEL, 0xFFFFFFFF)
    assert rd(transport, mmio.DEVICE_FEATURES) == 0
    wr(transport, mmio.QUEUE_SEL, 0xFFFFFFFF)
    for reg in (mmio.QUEUE_NUM, mmio.QUEUE_DESC_HIGH, mmio.QUEUE_READY):
        wr(transport, reg, 1)  # no such queue: ignored
    assert rd(transport, mmio.QUEUE_NUM_MAX) == 0 and rd(transport, mmio.QUEUE_READY) == 0
    wr(transport, mmio.QUEUE_NOTIFY, 0xFFFFFFFF)  # no such queue: nothing signalled


def test_live_queue_layout_cannot_change(transport):
    """Once QueueReady is 1, QueueNum and the ring addresses are fixed (4.2.3.2)."""
    negotiate(transport)
    setup_queue(transport)
    for reg in (mmio.QUEUE_NUM, mmio.QUEUE_DESC_LOW, mmio.QUEUE_DRIVER_LOW, mmio.QUEUE_DEVICE_LOW):
        wr(transport, reg, 0x8000)
    q = transport.queues[0]
    assert (q.size, q.desc_table, q.avail_ring, q.used_ring) == (16, 0x1000, 0x2000, 0x3000)



_REGS = st.sampled_from([mmio.DEVICE_FEATURES_SEL, mmio.DRIVER_FEATURES, mmio.DRIVER_FEATURES_SEL, mmio.QUEUE_SEL,
                         mmio.QUEUE_NUM, mmio.QUEUE_READY, mmio.QUEUE_NOTIFY, mmio.INTERRUPT_ACK, mmio.STATUS,
                         mmio.QUEUE_DESC_LOW, mmio.QUEUE_DESC_HIGH, mmio.QUEUE_DRIVER_LOW, mmio.QUEUE_DRIVER_HIGH,
                         mmio.QUEUE_DEVICE_LOW, mmio.QUEUE_DEVICE_HIGH, mmio.QUEUE_RESET, mmio.SHM_SEL])
_VALUES = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 2, 3, 0xB, 0xF, 0x80, 16, 0x1000, 0x2000]))
_ACCESS = st.one_of(
    st.tuples(st.just("w"), _REGS, st.just(4), _VALUES),
    st.tuples(st.sampled_from("rw"), st.integers(0, mmio.MMIO_WINDOW - 1), st.sampled_from([1, 2, 4, 8]), _VALUES),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accesses=st.lists(_ACCESS, max_size=40))
def test_fuzz_register_accesses_never_raise(transport, accesses):
    """Whatever a vCPU writes: no exception, status holds only defined bits, queue sizes stay valid,
    and the device is only activated with every ready queue inside guest RAM."""
    wr(transport, mmio.STATUS, 0)
    transport.device.activations.clear()
    for kind, off, width, value in accesses:
        if kind == "r":
            assert len(transport.read(off, width)) == width
        else:
            transport.write(off, (value & (1 << 8 * width) - 1).to_bytes(width, "little"))
        assert not transport.status & ~(0xF | mmio.DEVICE_NEEDS_RESET | mmio.FAILED)
        for q in transport.queues:
            assert q.size == 0 or (q.size <= q.max_size and not q.size & (q.size - 1))
    for q in transport.queues:
        if transport.activated and q.ready:
            assert transport.mem.check_range(q.desc_table, 16 * q.size)


class _EventIdxDevice(RecordingDevice):
    """Offers VIRTIO_F_EVENT_IDX, so the rings carry used_event/avail_event (2.7.10)."""

    def avail_features(self) -> int:
        return super().avail_features() | 1 << VIRTIO_F_EVENT_IDX


def test_queue_part_sizes_are_the_spec_table():
    """2.7 "Virtqueue Part Sizes": 16*n, 6+2*n, 6+8*n.  The 6 already counts flags, idx and
    used_event/avail_event, so EVENT_IDX adds nothing on top."""
    for n in (1, 16, 256, 32768):
        assert mmio.queue_part_sizes(n) == ((16 * n, 16), (6 + 2 * n, 2), (6 + 8 * n, 4))


@pytest.mark.parametrize("event_idx", [True, False])
@pytest.mark.parametrize("overhang,accepted", [(0, True), (2, False)])
def test_driver_area_ending_at_the_end_of_ram(event_idx, overhang, accepted):
    """A driver area (6 + 2*n bytes) that ends exactly at the end of RAM is a legal layout; the next
    2-byte-aligned position (the smallest overhang its alignment allows) runs off RAM and is refused."""
    ram = 1 << 20
    mem = GuestMemory.create([(0, ram)])
    loop = EventLoop()
    t = mmio.MmioTransport(_EventIdxDevice(), mem, loop, lambda: None)
    try:
        negotiate(t, features_lo=1 << VIRTIO_F_EVENT_IDX if event_idx else 0)
        assert rd(t, mmio.STATUS) == 0xB
        setup_queue(t, size=16, avail=ram - (6 + 2 * 16) + overhang)
        wr(t, mmio.STATUS, 0xF)
        status = rd(t, mmio.STATUS)
        if accepted:
            assert status == 0xF and t.device.activations
            assert t.queues[0].event_idx == event_idx
        else:
            assert status & mmio.DEVICE_NEEDS_RESET and not t.device.activations
    finally:
        t.close()
        loop.close()
        mem.close()
