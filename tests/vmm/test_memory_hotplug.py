"""katapy.vmm.memory_hotplug against a recording KVM VM and a scripted guest (no /dev/kvm needed).

What it checks is the ordering contract: slots exist before the guest is told,
a refusal undoes them, an unanswered request keeps them (the guest may use
them), DEL_MEM comes before a slot goes, and a removed block's host pages and
fd are released.
"""
from __future__ import annotations

import os

import pytest

from katapy.vmm import memory_hotplug as mh
from katapy.vmm.memory import GuestMemory
from katapy.upcall import wire
from katapy.vmm.upcall import UpcallRefused, UpcallTimeout

MIB = 1 << 20


class RecordingVm:
    """The two VmFd calls memory hotplug makes, with KVM's slot bookkeeping."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int]] = {}
        self.log: list[str] = []

    def add_memory_slot(self, gpa: int, size: int, host_addr: int) -> int:
        slot = min(set(range(len(self.slots) + 1)) - set(self.slots))
        self.slots[slot] = (gpa, size)
        self.log.append(f"slot+ {gpa:#x}")
        return slot

    def remove_memory_slot(self, slot: int) -> None:
        gpa, _ = self.slots.pop(slot)
        self.log.append(f"slot- {gpa:#x}")


class ScriptedGuest:
    def __init__(self, vm: RecordingVm) -> None:
        self.vm = vm
        self.fail: Exception | None = None

    def add_memory(self, base: int, size: int) -> None:
        assert all(any(g == b for g, _ in self.vm.slots.values())
                   for b in range(base, base + size, mh.BLOCK_SIZE)), "told before the slots exist"
        self.vm.log.append(f"ADD_MEM {base:#x}+{size >> 20}M")
        if self.fail:
            raise self.fail

    def remove_memory(self, base: int, size: int) -> None:
        self.vm.log.append(f"DEL_MEM {base:#x}+{size >> 20}M")
        if self.fail:
            raise self.fail


@pytest.fixture
def parts():
    mem = GuestMemory.create([(0, 256 * MIB)])
    vm = RecordingVm()
    guest = ScriptedGuest(vm)
    hp = mh.MemoryHotplug(vm, mem, 256 * MIB, 4 * mh.BLOCK_SIZE, guest)  # type: ignore[arg-type]
    yield hp, mem, vm, guest
    mem.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_window_sits_above_4_gib_and_the_boot_ram():
    assert mh.window_base(256 * MIB) == 4 << 30
    assert mh.window_base((5 << 30) + 1) == 6 << 30


def test_grow_then_shrink_orders_slots_and_upcalls(parts):
    hp, mem, vm, guest = parts
    fds = _fds()
    assert hp.resize(3 * mh.BLOCK_SIZE) == 3 * mh.BLOCK_SIZE
    base = 4 << 30
    assert vm.log == [f"slot+ {base:#x}", f"slot+ {base + mh.BLOCK_SIZE:#x}", f"slot+ {base + 2 * mh.BLOCK_SIZE:#x}",
                      f"ADD_MEM {base:#x}+384M"]
    mem.write(base + 2 * mh.BLOCK_SIZE + 5, b"guest data")  # hot-added RAM is guest memory for the devices
    assert mem.read(base + 2 * mh.BLOCK_SIZE + 5, 10) == b"guest data"
    vm.log.clear()
    assert hp.resize(mh.BLOCK_SIZE) == mh.BLOCK_SIZE
    assert vm.log == [f"DEL_MEM {base + mh.BLOCK_SIZE:#x}+256M", f"slot- {base + 2 * mh.BLOCK_SIZE:#x}",
                      f"slot- {base + mh.BLOCK_SIZE:#x}"]
    assert not mem.check_range(base + mh.BLOCK_SIZE, 1)
    assert _fds() == fds + 2  # the block still plugged: its memfd and the mapping's dup of it
    hp.resize(0)
    assert _fds() == fds and vm.slots == {}


def test_refusal_undoes_the_new_slots(parts):
    hp, mem, vm, guest = parts
    fds = _fds()
    guest.fail = UpcallRefused(wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest(4 << 30, mh.BLOCK_SIZE)), 16)
    with pytest.raises(mh.MemoryHotplugError, match="refused"):
        hp.resize(2 * mh.BLOCK_SIZE)
    assert vm.slots == {} and hp.plugged == 0 and _fds() == fds
    assert len(mem.regions) == 1


def test_unanswered_add_keeps_the_slots_and_a_refused_removal_keeps_them_too(parts):
    hp, mem, vm, guest = parts
    guest.fail = UpcallTimeout("ADD_MEM: no answer within 0.1 s", sent=True)
    with pytest.raises(mh.MemoryHotplugError, match="stays plugged"):
        hp.resize(mh.BLOCK_SIZE)
    assert hp.plugged == mh.BLOCK_SIZE and len(vm.slots) == 1  # the guest may have onlined it
    guest.fail = UpcallRefused(wire.Request(wire.MsgType.DEL_MEM, wire.MemRequest(4 << 30, mh.BLOCK_SIZE)), 16)
    with pytest.raises(mh.MemoryHotplugError, match="stays plugged"):
        hp.resize(0)
    assert hp.plugged == mh.BLOCK_SIZE and len(vm.slots) == 1
    guest.fail = None
    hp.resize(0)
    assert vm.slots == {}


def test_a_request_that_never_left_is_undone_like_a_refusal(parts):
    from katapy.vmm.upcall import UpcallConnectError

    hp, mem, vm, guest = parts
    guest.fail = UpcallConnectError("nothing listens on vsock port 219")  # sent=False: the guest saw nothing
    with pytest.raises(mh.MemoryHotplugError, match="refused|never"):
        hp.resize(mh.BLOCK_SIZE)
    assert vm.slots == {} and hp.plugged == 0


def test_bad_sizes_are_refused_before_anything_changes(parts):
    hp, mem, vm, guest = parts
    for bad in (mh.BLOCK_SIZE + MIB, 5 * mh.BLOCK_SIZE, -mh.BLOCK_SIZE):
        with pytest.raises(mh.MemoryHotplugError):
            hp.resize(bad)
    assert vm.log == []
