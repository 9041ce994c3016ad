"""add_device/remove_device/guest_device_address on a running VM, per backend, without a Linux guest.

The builtin backend runs the tiny PVH guest on this host's /dev/kvm (kvm-pvm is enough); that guest
has no upcall server, so the VMM's upcall client is replaced by one that records ADD_MMIO/DEL_MMIO
and answers as a guest would.  The real guest binding the device is tests/vmm/test_device_hotplug_guest.py
(``kvm``).  QEMU microvm has no hotplug bus: its errors say so.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import trio

from katapy.hypervisor.base import BlockDevice, HypervisorError, NetDevice, UnsupportedError, VmConfig
from katapy.testing import fds

pytest.importorskip("katapy.vmm.api", reason="the built-in VMM (katapy.vmm.api) is not in this tree yet")

BASE = 0xD0001000  # the first hotplug slot: the vsock device has the first window (0xd0000000)


class RecordingUpcall:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.refuse = False

    def add_mmio(self, base: int, size: int, irq: int) -> None:
        from katapy.upcall import wire
        from katapy.vmm.upcall import UpcallRefused

        self.calls.append(("add", base, irq))
        if self.refuse:
            raise UpcallRefused(wire.Request(wire.MsgType.ADD_MMIO, wire.MmioRequest(base, size, irq)), 19)

    def remove_mmio(self, base: int, size: int, irq: int) -> None:
        self.calls.append(("del", base, irq))

    def close(self) -> None:
        pass


def _cfg(tiny: dict[str, Path], state: Path) -> VmConfig:
    return VmConfig("tiny", state, tiny["halt"], tiny["initrd"], memory_mib=64, max_memory_mib=64)


def _fds_to(target: str) -> int:
    return sum(1 for t in fds.snapshot().values() if t == target)


@pytest.fixture
def tap_fd():
    """An fd attached to a vnet_hdr tap in a scratch network namespace (as katapy.resource.network opens it)."""
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs iproute2 and /dev/net/tun")
    from katapy.resource.network.netns import run_in_netns
    from katapy.resource.network.tap import open_queue

    ns = f"katapy-hp-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot make a network namespace: {r.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "khp0", "mode", "tap", "vnet_hdr"], check=True)
        fd = run_in_netns(f"/var/run/netns/{ns}", open_queue, "khp0")
        yield fd
        os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def test_builtin_plugs_and_unplugs_block_and_net_devices(tiny_guest, short_tmp, tap_fd):
    pytest.importorskip("katapy.vmm.virtio.blk")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this host")
    from katapy.hypervisor.builtin import BuiltinHypervisor

    img = short_tmp / "disk.img"
    img.write_bytes(bytes(1 << 20))
    before = fds.snapshot()
    tap_target = os.readlink(f"/proc/self/fd/{tap_fd}")

    async def main() -> RecordingUpcall:
        hv = BuiltinHypervisor(boot_protocol="pvh")
        await hv.start_vm(_cfg(tiny_guest, short_tmp / "sb"))
        upcall = hv._vmm._upcall = RecordingUpcall()
        try:
            await hv.add_device(BlockDevice("disk0", img))
            assert hv.guest_device_address("disk0") == BASE
            assert _fds_to(str(img)) == 1
            await hv.add_device(NetDevice("net0", "khp0", "02:00:00:00:11:22", tap_fd=tap_fd))
            assert hv.guest_device_address("net0") == BASE + 0x1000
            assert _fds_to(tap_target) == 2  # the caller's fd and the back end's duplicate
            with pytest.raises(HypervisorError, match="a device with id 'disk0' exists already"):
                await hv.add_device(BlockDevice("disk0", img))
            with pytest.raises(HypervisorError, match="add_device d1: .*/nope does not exist"):
                await hv.add_device(BlockDevice("d1", short_tmp / "nope"))
            with pytest.raises(HypervisorError, match="guest_device_address: no device with id 'nope'"):
                hv.guest_device_address("nope")
            assert hv.guest_device_address("vsock") < BASE  # the cold vsock device sits below the slots

            await hv.remove_device("disk0")
            assert _fds_to(str(img)) == 0
            with pytest.raises(HypervisorError, match="guest_device_address: no device with id 'disk0'"):
                hv.guest_device_address("disk0")
            await hv.remove_device("net0")
            assert _fds_to(tap_target) == 1  # only the caller's own
            with pytest.raises(HypervisorError, match="remove_device: no device with id 'net0'"):
                await hv.remove_device("net0")

            upcall.refuse = True  # the guest answers ENODEV: nothing stays
            with pytest.raises(HypervisorError, match="add_device disk1: the guest refused or never got ADD_MMIO"):
                await hv.add_device(BlockDevice("disk1", img))
            assert _fds_to(str(img)) == 0
            upcall.refuse = False
            await hv.add_device(BlockDevice("disk1", img))  # the emptied slot again
            assert hv.guest_device_address("disk1") == BASE

            await hv.pause_vm()
            with pytest.raises(HypervisorError, match="remove_device disk1: VM is paused, not running"):
                await hv.remove_device("disk1")
            await hv.resume_vm()
            await hv.stop_vm()  # disk1 is still plugged: the VMM's stop releases it
            assert _fds_to(str(img)) == 0
        finally:
            await hv.cleanup()
        return upcall

    upcall = trio.run(main)
    one, two = ("add", BASE, 6), ("add", BASE + 0x1000, 7)  # irq 5 is vsock's
    assert upcall.calls == [one, two, ("del", BASE, 6), ("del", BASE + 0x1000, 7), one, one]
    fds.wait_released(before)


def test_qemu_has_no_device_hotplug_and_says_why():
    from katapy.cli.check import resize_support
    from katapy.hypervisor.qemu import QemuHypervisor

    hv = QemuHypervisor(Path("/usr/bin/qemu-system-x86_64"))
    with pytest.raises(UnsupportedError, match="QEMU microvm places its devices itself"):
        hv.guest_device_address("blk0")
    assert "device hotplug: no (it has no hotplug bus" in resize_support("qemu", 1)
    assert "device hotplug: virtio-blk and virtio-net" in resize_support("builtin", 1)
