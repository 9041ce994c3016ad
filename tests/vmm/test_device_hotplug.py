"""Device hotplug on the built-in VMM without a Linux guest: placeholder slots, the bus swap, the
populate/depopulate bookkeeping (fds released), DeviceHotplug's ordering against a scripted upcall, and
a real KVM VM (kvm-pvm is enough) whose vCPU polls the slot while the host plugs and unplugs a disk.

The guest side (binding ``virtio-mmio.<N>``) is tests/vmm/test_device_hotplug_guest.py's (``kvm``).
"""
from __future__ import annotations

import os
import select
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from katapy.testing import fds
from katapy.upcall import wire
from katapy.vmm import device_hotplug as dh
from katapy.vmm.boot import layout
from katapy.vmm.bus import Bus
from katapy.vmm.config import ConfigError, VmResources
from katapy.vmm.device_manager import DeviceManagerError, MmioDeviceManager
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory
from katapy.vmm.upcall import UpcallConnectError, UpcallRefused, UpcallTimeout
from katapy.vmm.virtio import mmio
from katapy.vmm.virtio.blk import BlockDevice
from katapy.vmm.virtio.mmio import MmioTransport
from katapy.vmm.virtio.placeholder import PlaceholderSlot
from tests.vmm.conftest import SerialCapture
from tests.vmm.guestasm import protected_mode_guest
from tests.vmm.recording_device import RecordingDevice

BASE = layout.MMIO_MEM_START
SLOT = layout.MMIO_DEVICE_LEN


def rd(dev, offset: int) -> int:
    return struct.unpack("<I", dev.read(offset, 4))[0]


def _disk(tmp_path: Path, name: str = "disk.img", size: int = 1 << 20) -> Path:
    p = tmp_path / name
    p.write_bytes(b"KATAPYHP" + bytes(size - 8))
    return p


def _open_fds_to(path: Path) -> int:
    return sum(1 for target in fds.snapshot().values() if target == str(path))


# -- placeholder ------------------------------------------------------------------------------

def test_placeholder_reads_as_a_virtio_mmio_window_without_a_device():
    p = PlaceholderSlot()
    assert rd(p, mmio.MAGIC_VALUE) == 0x74726976  # "virt"
    assert rd(p, mmio.VERSION) == 2
    assert rd(p, mmio.DEVICE_ID) == 0  # virtio_mmio_probe: -ENODEV, the slot stays unbound
    for off in (mmio.VENDOR, mmio.DEVICE_FEATURES, mmio.QUEUE_NUM_MAX, mmio.STATUS, mmio.INTERRUPT_STATUS,
                mmio.CONFIG, 0xFFC):
        assert rd(p, off) == 0, hex(off)
    assert p.read(mmio.MAGIC_VALUE, 2) == b"\0\0" and p.read(1, 4) == bytes(4)  # sub-word, unaligned
    p.write(mmio.STATUS, struct.pack("<I", 0xF))
    p.write(mmio.DEVICE_ID, struct.pack("<I", 2))
    assert rd(p, mmio.STATUS) == 0 and rd(p, mmio.DEVICE_ID) == 0  # writes change nothing


# -- the bus swap ------------------------------------------------------------------------------

class _Const:
    def __init__(self, value: int) -> None:
        self.value = value
        self.entered = threading.Event()
        self.release = threading.Event()
        self.block = False

    def read(self, offset: int, length: int) -> bytes:
        if self.block:
            self.entered.set()
            self.release.wait(5)
        return struct.pack("<I", self.value)

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_bus_replace_swaps_the_device_and_refuses_a_missing_base():
    bus = Bus("mmio")
    a, b = _Const(1), _Const(2)
    bus.insert(a, BASE, SLOT)
    assert bus.replace(BASE, b) is a
    assert bus.device_at(BASE) is b and rd_bus(bus, BASE) == 2
    with pytest.raises(ValueError, match="no device at 0xd0001000"):
        bus.replace(BASE + SLOT, a)
    bus.remove(BASE)
    assert bus.device_at(BASE) is None and bus.read(BASE, 4) == b"\xff" * 4


def rd_bus(bus: Bus, addr: int) -> int:
    return struct.unpack("<I", bus.read(addr, 4))[0]


def test_bus_replace_waits_for_an_access_inside_the_old_device():
    bus = Bus("mmio")
    old, new = _Const(1), _Const(2)
    old.block = True
    bus.insert(old, BASE, SLOT)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(rd_bus(bus, BASE)))
    reader.start()
    assert old.entered.wait(5)
    swapped = threading.Event()
    swapper = threading.Thread(target=lambda: (bus.replace(BASE, new), swapped.set()))
    swapper.start()
    time.sleep(0.2)
    assert not swapped.is_set(), "replace returned while a vCPU was still inside the old device"
    old.release.set()
    swapper.join(5)
    reader.join(5)
    assert swapped.is_set() and got == [1]
    assert rd_bus(bus, BASE) == 2


def test_readers_racing_swaps_always_find_a_device():
    bus = Bus("mmio")
    devs = [_Const(1), _Const(2)]
    bus.insert(devs[0], BASE, SLOT)
    bus.insert(_Const(9), BASE + SLOT, SLOT)  # a neighbour, so the table has more than one range
    stop = threading.Event()
    seen: set[int] = set()

    def reader() -> None:
        while not stop.is_set():
            seen.add(rd_bus(bus, BASE))
            assert rd_bus(bus, BASE + SLOT) == 9

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(2000):
        bus.replace(BASE, devs[(i + 1) % 2])
    stop.set()
    for t in threads:
        t.join(5)
    assert seen <= {1, 2} and seen, seen  # never 0xffffffff (unclaimed) nor the neighbour


# -- slots: reserve, populate, depopulate ---------------------------------------------------------

@pytest.fixture
def manager():
    mem = GuestMemory.create([(0, 16 << 20)])
    loop = EventLoop()
    loop.start()
    bus = Bus("mmio")
    dm = MmioDeviceManager(None, mem, bus, loop)
    yield dm
    loop.stop()
    dm.close()
    loop.close()
    mem.close()


def test_slots_follow_the_cold_devices_on_the_command_line(manager):
    manager.add(RecordingDevice())
    slots = manager.reserve_hotplug(3)
    assert [(s.base, s.irq) for s in slots] == [(BASE + SLOT * i, layout.VIRTIO_IRQ_BASE + i) for i in (1, 2, 3)]
    assert manager.cmdline_fragments() == [f"virtio_mmio.device=4K@{BASE + SLOT * i:#x}:{5 + i}" for i in range(4)]
    assert all(isinstance(manager.bus.device_at(s.base), PlaceholderSlot) for s in slots)


def test_pins_running_out_is_a_clear_error(manager):
    for _ in range(3):
        manager.add(RecordingDevice())
    with pytest.raises(DeviceManagerError, match=r"17 hotplug slots do not fit: IOAPIC pins 8\.\.23 are left \(16\)"):
        manager.reserve_hotplug(17)
    assert manager.hotplug == []
    manager.reserve_hotplug(16)
    with pytest.raises(DeviceManagerError, match="out of IOAPIC pins"):
        manager.add(RecordingDevice())


def test_resources_refuse_more_slots_than_pins():
    res = VmResources(hotplug_slots=18, devices=[RecordingDevice(), RecordingDevice()])
    res.boot = None
    with pytest.raises(ConfigError, match=r"hotplug_slots=18: must be 0\.\.17 .*2 taken by cold-plugged devices"):
        res.validate()


def test_populate_and_depopulate_swap_the_bus_entry_and_release_every_fd(manager, tmp_path):
    manager.reserve_hotplug(2)
    img = _disk(tmp_path)
    before = fds.snapshot()
    dev = BlockDevice(img)
    slot = manager.populate(dev)
    assert (slot.base, slot.irq) == (BASE, layout.VIRTIO_IRQ_BASE)
    t = manager.bus.device_at(BASE)
    assert isinstance(t, MmioTransport) and t.device is dev
    assert rd(t, mmio.DEVICE_ID) == 2 and manager.find(dev) is slot
    assert _open_fds_to(img) == 1
    second = manager.populate(BlockDevice(img, read_only=True))
    assert second.base == BASE + SLOT
    with pytest.raises(DeviceManagerError, match=r"no free virtio-mmio hotplug slot \(all 2 are in use\)"):
        manager.populate(RecordingDevice())
    manager.depopulate(BASE)
    assert isinstance(manager.bus.device_at(BASE), PlaceholderSlot) and manager.find(dev) is None
    assert dev.image.fd == -1
    with pytest.raises(DeviceManagerError, match="no hot-plugged virtio-mmio device at 0xd0000000"):
        manager.depopulate(BASE)
    manager.depopulate(BASE + SLOT)
    fds.wait_released(before)  # image fds, irqfd and ioeventfd eventfds
    again = manager.populate(BlockDevice(img))  # an emptied slot is reusable
    assert again.base == BASE


# -- DeviceHotplug's ordering ----------------------------------------------------------------------

class ScriptedGuest:
    """The two upcall requests; checks the slot is populated before ADD_MMIO and still is at DEL_MMIO."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.log: list[str] = []
        self.fail: Exception | None = None

    def _request(self, kind: wire.MsgType, base: int, size: int, irq: int) -> wire.Request:
        return wire.Request(kind, wire.MmioRequest(base, size, irq))

    def add_mmio(self, base: int, size: int, irq: int) -> None:
        assert isinstance(self.bus.device_at(base), MmioTransport), "told before the slot was populated"
        self.log.append(f"ADD_MMIO {base:#x} {size:#x} {irq}")
        if self.fail:
            raise self.fail

    def remove_mmio(self, base: int, size: int, irq: int) -> None:
        assert isinstance(self.bus.device_at(base), MmioTransport), "the device went before DEL_MMIO"
        self.log.append(f"DEL_MMIO {base:#x} {size:#x} {irq}")
        if self.fail:
            raise self.fail


@pytest.fixture
def hotplug(manager):
    manager.reserve_hotplug(2)
    guest = ScriptedGuest(manager.bus)
    return dh.DeviceHotplug(manager, guest), guest, manager


def _add_req(base: int = BASE, irq: int = 5) -> wire.Request:
    return wire.Request(wire.MsgType.ADD_MMIO, wire.MmioRequest(base, SLOT, irq))


def test_plug_then_unplug(hotplug, tmp_path):
    hp, guest, dm = hotplug
    img = _disk(tmp_path)
    before = fds.snapshot()
    assert hp.plug(BlockDevice(img)) == (BASE, 5)
    assert list(hp.plugged()) == [BASE]
    hp.unplug(BASE)
    assert guest.log == [f"ADD_MMIO {BASE:#x} 0x1000 5", f"DEL_MMIO {BASE:#x} 0x1000 5"]
    assert isinstance(dm.bus.device_at(BASE), PlaceholderSlot) and hp.plugged() == {}
    fds.wait_released(before)


@pytest.mark.parametrize("failure", [
    UpcallRefused(_add_req(), 19),  # the guest answered ENODEV
    UpcallConnectError("no upcall server", sent=False),  # the request never left
], ids=["refused", "never-sent"])
def test_a_refusal_empties_the_slot_and_closes_the_device(hotplug, tmp_path, failure):
    hp, guest, dm = hotplug
    img = _disk(tmp_path)
    before = fds.snapshot()
    guest.fail = failure
    with pytest.raises(dh.DeviceHotplugError, match=r"refused or never got ADD_MMIO .*0xd0000000.*the slot was emptied"):
        hp.plug(BlockDevice(img))
    assert isinstance(dm.bus.device_at(BASE), PlaceholderSlot) and hp.plugged() == {}
    fds.wait_released(before)
    guest.fail = None
    assert hp.plug(BlockDevice(img)) == (BASE, 5)  # the same slot again


def test_no_answer_keeps_the_device_plugged(hotplug, tmp_path):
    hp, guest, dm = hotplug
    img = _disk(tmp_path)
    guest.fail = UpcallTimeout("upcall ADD_MMIO: no answer in 120 s", request=_add_req(), sent=True)
    with pytest.raises(dh.DeviceInDoubt, match="no answer from the guest .*the device stays plugged") as info:
        hp.plug(BlockDevice(img))
    assert (info.value.base, info.value.irq) == (BASE, 5)
    assert isinstance(dm.bus.device_at(BASE), MmioTransport) and _open_fds_to(img) == 1
    guest.fail = None
    hp.unplug(BASE)  # what stayed can still be taken out
    assert _open_fds_to(img) == 0


def test_unplug_refused_or_unanswered_keeps_the_device(hotplug, tmp_path):
    hp, guest, dm = hotplug
    img = _disk(tmp_path)
    hp.plug(BlockDevice(img))
    del_req = wire.Request(wire.MsgType.DEL_MMIO, wire.MmioRequest(BASE, SLOT, 5))
    for failure in (UpcallRefused(del_req, 16), UpcallTimeout("no answer", request=del_req, sent=True)):
        guest.fail = failure
        with pytest.raises(dh.DeviceHotplugError, match="unplugging the virtio-blk device at 0xd0000000: .*stays plugged"):
            hp.unplug(BASE)
        assert isinstance(dm.bus.device_at(BASE), MmioTransport) and _open_fds_to(img) == 1


def test_bad_input_changes_nothing(hotplug, tmp_path):
    hp, guest, dm = hotplug
    dev = RecordingDevice()  # device id 0x2a: neither blk nor net
    with pytest.raises(dh.DeviceHotplugError, match="cannot be hot-plugged: only virtio-blk and virtio-net"):
        hp.plug(dev)
    with pytest.raises(dh.DeviceHotplugError, match=r"no hot-plugged device at 0xd0005000 \(hot-plugged: none\)"):
        hp.unplug(BASE + 5 * SLOT)
    img = _disk(tmp_path)
    hp.plug(BlockDevice(img))
    hp.plug(BlockDevice(img, read_only=True))
    third = BlockDevice(img)
    with pytest.raises(dh.DeviceHotplugError, match=r"no free virtio-mmio hotplug slot \(all 2 are in use\)"):
        hp.plug(third)
    assert third.image.fd == -1  # handed over, so closed
    assert guest.log == [f"ADD_MMIO {BASE:#x} 0x1000 5", f"ADD_MMIO {BASE + SLOT:#x} 0x1000 6"]
    assert sorted(hp.plugged()) == [BASE, BASE + SLOT]


# -- virtio-blk on a host block device ---------------------------------------------------------------

def test_blk_back_end_on_a_loop_device_has_the_device_size(tmp_path):
    img = _disk(tmp_path, size=3 << 20)
    r = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {r.stderr.strip()}")
    loop_dev = r.stdout.strip()
    try:
        dev = BlockDevice(loop_dev)
        try:
            assert os.stat(loop_dev).st_size == 0  # what st_size says for a block device
            assert dev.image.size == 3 << 20 and dev.image.sectors == 6144
            assert struct.unpack_from("<Q", dev.config_space())[0] == 6144  # capacity in config space
        finally:
            dev.close()
    finally:
        subprocess.run(["losetup", "-d", loop_dev], capture_output=True)


# -- the whole Vmm with a vCPU polling the slot --------------------------------------------------------

POLL_SLOT = r"""
    mov $0xd0000000, %ebx
    mov $0xffffffff, %esi
1:  mov $20000, %ecx
2:  loop 2b                   /* spin inside the guest between MMIO reads */
    mov 0x08(%ebx), %eax      /* DeviceID of the hotplug slot */
    cmp %eax, %esi
    je 1b
    mov %eax, %esi
    call emit_eax             /* (shifts %eax out) */
    test %esi, %esi
    jz 1b
    movl $0, 0x50(%ebx)       /* QueueNotify 0 of the new device: KVM's ioeventfd takes it */
    jmp 1b
"""


class RecordingUpcall:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        self.fail: Exception | None = None

    def add_mmio(self, base: int, size: int, irq: int) -> None:
        self.calls.append(("add", base, size, irq))
        if self.fail:
            raise self.fail

    def remove_mmio(self, base: int, size: int, irq: int) -> None:
        self.calls.append(("del", base, size, irq))

    def close(self) -> None:
        pass


def _readable(fd: int, timeout_ms: int = 5000) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout_ms))


def test_a_running_vcpu_sees_the_device_come_and_go(vmm, tmp_path):
    img = _disk(tmp_path)
    out = SerialCapture()
    vmm.configure_machine(1, 32)
    vmm.set_hotplug_slots(2)
    vmm.add_serial_output(out)
    vmm.set_flat_boot(protected_mode_guest(POLL_SLOT))
    upcall = RecordingUpcall()
    vmm.start()
    vmm._upcall = upcall  # the guest has no upcall server; record what would be sent
    zero, two = struct.pack("<I", 0), struct.pack("<I", 2)
    assert out.wait_for(zero), "the guest never read the placeholder's DeviceID 0"
    before = fds.snapshot()
    dev = BlockDevice(img)
    assert vmm.hotplug_device(dev) == (BASE, 5)
    assert vmm.device_address(dev) == BASE
    assert out.wait_for(zero + two), bytes(out.data)
    slot = vmm.built.devices.hotplug[0].plugged
    assert _readable(slot.kick_fds[0]), "QueueNotify did not reach the new ioeventfd"
    assert slot.transport.notify_exits == 0
    vmm.unplug_device(BASE)
    assert out.wait_for(zero + two + zero), bytes(out.data)
    assert upcall.calls == [("add", BASE, SLOT, 5), ("del", BASE, SLOT, 5)]
    fds.wait_released(before)
    assert vmm.device_address(dev) is None
    with pytest.raises(Exception, match="no hot-plugged device at 0xd0000000"):
        vmm.unplug_device(BASE)
    vmm.pause()
    try:
        again = BlockDevice(img)
        with pytest.raises(Exception, match="cannot hot-plug a device into a VM that is paused"):
            vmm.hotplug_device(again)
        assert again.image.fd == -1  # the VMM closed what it was handed
    finally:
        vmm.resume()
    # a device left plugged is released by stop()
    assert vmm.hotplug_device(BlockDevice(img)) == (BASE, 5)
    assert out.wait_for(zero + two + zero + two)
    vmm.stop()
    assert _open_fds_to(img) == 0


def test_hotplug_needs_a_started_vm_and_an_upcall_socket(vmm, tmp_path):
    img = _disk(tmp_path)
    dev = BlockDevice(img)
    with pytest.raises(Exception, match="cannot hot-plug a device into a VM that is not-started"):
        vmm.hotplug_device(dev)
    assert dev.image.fd == -1
    with pytest.raises(ConfigError, match=r"hotplug_slots=20: must be 0\.\.19"):
        vmm.set_hotplug_slots(20)
    vmm.configure_machine(1, 32)
    vmm.set_hotplug_slots(1)
    vmm.set_flat_boot(protected_mode_guest(POLL_SLOT))
    vmm.start()
    dev = BlockDevice(img)
    with pytest.raises(Exception, match="device hotplug needs the upcall channel"):
        vmm.hotplug_device(dev)
    assert dev.image.fd == -1 and isinstance(vmm.built.mmio_bus.device_at(BASE), PlaceholderSlot)
