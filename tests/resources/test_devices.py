"""Containers' block devices on the host side (katapy.resource.devices): spec, host node, hot-attach.

The host tree is a tmp directory laid out as sysfs and devtmpfs are
(``sys/dev/block/<major>:<minor>/uevent`` with ``DEVNAME``, real block nodes
made with mknod under ``dev/``).  The hypervisor is a recording fake that
keeps the hotplug contract of ``katapy.hypervisor.base``: ``add_device`` on a
running VM gives the device a virtio-mmio window, ``guest_device_address`` says
where, ``remove_device`` takes it out; ``hotplug=False`` answers UnsupportedError
as QEMU's microvm does.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from katapy.hypervisor.base import BlockDevice, HypervisorError, UnsupportedError
from katapy.resource.devices import (
    MMIOBLK,
    BlockRequest,
    DeviceAttachError,
    DeviceSpecError,
    DeviceUnsupported,
    HostDeviceError,
    SandboxDevices,
    block_requests,
    resolve_block,
)
from katapy.resource.devices.manager import device_id
from katapy.resource.devices.spec import is_privileged, without_block_devices, writable

MMIO_BASE = 0xD0000000
MMIO_SIZE = 0x1000


def _host(root: Path, name: str, major: int, minor: int, node: bool = True) -> Path:
    d = root / "sys/dev/block" / f"{major}:{minor}"
    d.mkdir(parents=True)
    (d / "uevent").write_text(f"MAJOR={major}\nMINOR={minor}\nDEVNAME={name}\nDEVTYPE=disk\n")
    path = root / "dev" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if node:
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(major, minor))
    return path


@pytest.fixture
def host(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("making block device nodes (mknod) needs root")
    _host(tmp_path, "loop3", 7, 3)
    _host(tmp_path, "loop4", 7, 4)
    _host(tmp_path, "mapper/dm-data", 253, 1)
    return tmp_path


class FakeHypervisor:
    """Hot-plug into free virtio-mmio slots, as the builtin backend's contract says."""

    name = "builtin"
    vmm_label = "katapy's built-in VMM"

    def __init__(self, hotplug: bool = True, fail_on: str | None = None) -> None:
        self.hotplug = hotplug
        self.fail_on = fail_on  # a host path whose add fails (the guest did not bind it)
        self.devices: dict[str, BlockDevice] = {}
        self.slots: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []

    async def add_device(self, dev: BlockDevice) -> None:
        self.calls.append(("add", dev.dev_id))
        if not self.hotplug:
            raise UnsupportedError(f"add_device {dev.dev_id}: QEMU microvm has no hotplug; add devices before "
                                   f"start_vm")
        if dev.dev_id in self.devices:
            raise HypervisorError(f"add_device: a device with id {dev.dev_id!r} exists already")
        if str(dev.path) == self.fail_on:
            raise HypervisorError(f"add_device {dev.dev_id}: the guest did not bind virtio-mmio.2")
        used = set(self.slots.values())
        self.slots[dev.dev_id] = next(MMIO_BASE + i * MMIO_SIZE for i in range(8) if MMIO_BASE + i * MMIO_SIZE
                                      not in used)
        self.devices[dev.dev_id] = dev

    def guest_device_address(self, dev_id: str) -> int:
        if not self.hotplug:
            raise UnsupportedError("QEMU microvm has no hotplug")
        return self.slots[dev_id]

    async def remove_device(self, dev_id: str) -> None:
        self.calls.append(("remove", dev_id))
        if dev_id not in self.devices:
            raise HypervisorError(f"remove_device: no device with id {dev_id!r}")
        del self.devices[dev_id], self.slots[dev_id]


def _spec(*devs: tuple[str, int, int, str], extra_rules: list | None = None) -> dict:
    """config.json's linux section as containerd's CRI writes it for ContainerConfig.devices."""
    entries = [{"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666}]
    rules = [{"allow": False, "access": "rwm"}]
    for path, major, minor, access in devs:
        entries.append({"path": path, "type": "b", "major": major, "minor": minor, "fileMode": 0o660})
        rules.append({"allow": True, "type": "b", "major": major, "minor": minor, "access": access})
    return {"linux": {"devices": entries, "resources": {"devices": rules + (extra_rules or [])}}}


# -- the spec ---------------------------------------------------------------------------------


def test_block_entries_and_their_write_permission() -> None:
    spec = _spec(("/dev/xvdb", 7, 3, "rwm"), ("/dev/xvdc", 7, 4, "r"))
    assert block_requests(spec) == [BlockRequest("/dev/xvdb", 7, 3, read_only=False),
                                    BlockRequest("/dev/xvdc", 7, 4, read_only=True)]
    assert block_requests({"linux": {"devices": [{"path": "/dev/tty0", "type": "c", "major": 4, "minor": 0}]}}) == []
    assert block_requests({}) == []


def test_the_allowlist_is_read_in_order_later_rules_win() -> None:
    deny_w = {"allow": False, "type": "b", "major": 7, "access": "w"}
    assert not writable([{"allow": True, "type": "b", "major": 7, "minor": 3, "access": "rwm"}, deny_w], 7, 3)
    assert writable([deny_w, {"allow": True, "type": "a", "access": "rwm"}], 7, 3)  # type a: any device
    assert writable([{"allow": True, "type": "b", "major": -1, "minor": -1}], 7, 3)  # no access: rwm
    assert not writable([{"allow": False, "access": "rwm"}], 7, 3)  # deny-all and nothing else
    assert not writable([{"allow": False, "access": "rwm"},
                         {"allow": True, "type": "c", "major": 7, "minor": 3, "access": "rwm"}], 7, 3)  # c is not b
    assert writable([{"allow": True, "type": "c", "major": 7, "minor": 3, "access": "r"}], 7, 3)  # says nothing of b
    assert writable(None, 7, 3) and writable([], 7, 3)  # the spec restricts nothing


@pytest.mark.parametrize("linux, message", [
    ({"devices": {"path": "/dev/x"}}, "linux.devices must be a list"),
    ({"devices": ["/dev/x"]}, r"linux.devices\[0\] must be an object"),
    ({"devices": [{"type": "b", "path": "xvdb", "major": 7, "minor": 3}]}, "absolute container path"),
    ({"devices": [{"type": "b", "path": "/dev/x", "minor": 3}]}, "major must be a non-negative integer"),
    ({"devices": [{"type": "b", "path": "/dev/x", "major": 7, "minor": "3"}]}, "minor must be"),
    ({"devices": [{"type": "b", "path": "/dev/x", "major": 7, "minor": 3}] * 2}, "listed twice"),
    ({"devices": [{"type": "b", "path": "/dev/x", "major": 7, "minor": 3}], "resources": {"devices": "rwm"}},
     "linux.resources.devices must be a list"),
])
def test_malformed_device_entries_are_refused(linux, message) -> None:
    with pytest.raises(DeviceSpecError, match=message):
        block_requests({"linux": linux})


# -- the host node ----------------------------------------------------------------------------------


def test_host_node_from_major_minor(host: Path) -> None:
    assert resolve_block(7, 3, host) == host / "dev/loop3"
    assert resolve_block(253, 1, host) == host / "dev/mapper/dm-data"  # DEVNAME may have a directory


def test_host_node_errors_name_the_device(host: Path) -> None:
    with pytest.raises(HostDeviceError, match=r"no host block device 7:9 \(.*sys/dev/block/7:9/uevent does not"):
        resolve_block(7, 9, host)
    _host(host, "vanished", 8, 0, node=False)
    with pytest.raises(HostDeviceError, match="8:0: its node .*dev/vanished cannot be found"):
        resolve_block(8, 0, host)
    _host(host, "file", 8, 16, node=False)
    (host / "dev/file").write_text("")
    with pytest.raises(HostDeviceError, match="8:16: .*dev/file is not a block device"):
        resolve_block(8, 16, host)
    _host(host, "other", 8, 32, node=False)
    os.mknod(host / "dev/other", stat.S_IFBLK | 0o600, os.makedev(8, 33))
    with pytest.raises(HostDeviceError, match="8:32: .*dev/other is 8:33"):
        resolve_block(8, 32, host)
    d = host / "sys/dev/block/9:0"
    d.mkdir(parents=True)
    (d / "uevent").write_text("MAJOR=9\nMINOR=0\nDEVNAME=../etc/passwd\n")
    with pytest.raises(HostDeviceError, match="bad DEVNAME"):
        resolve_block(9, 0, host)


# -- attaching ----------------------------------------------------------------------------------------


def test_attach_gives_the_agent_mmioblk_devices_and_detach_takes_them_out(host: Path) -> None:
    hv = FakeHypervisor()
    devs = SandboxDevices(hv, "sb", sys_root=host)

    async def main() -> None:
        got = await devs.attach("c1", _spec(("/dev/xvdb", 7, 3, "rwm"), ("/dev/xvdc", 7, 4, "r")))
        assert [(d.type, d.vm_path, d.container_path) for d in got] == [
            (MMIOBLK, "0xd0000000", "/dev/xvdb"), (MMIOBLK, "0xd0001000", "/dev/xvdc")]
        assert [d.id for d in got] == [device_id("c1", "/dev/xvdb"), device_id("c1", "/dev/xvdc")]
        added = hv.devices
        assert [(d.path, d.read_only) for d in added.values()] == [(host / "dev/loop3", False),
                                                                   (host / "dev/loop4", True)]
        # another container: its own device; a spec without block devices attaches nothing
        assert await devs.attach("c2", {"linux": {"devices": []}}) == []
        await devs.detach("c1")
        assert hv.devices == {} and devs.attached == {}
        await devs.detach("c1")  # twice: nothing left to do
        assert [c for c, _ in hv.calls] == ["add", "add", "remove", "remove"]

    trio.run(main)


def test_a_device_two_containers_ask_for_is_attached_once(host: Path) -> None:
    hv = FakeHypervisor()
    devs = SandboxDevices(hv, "sb", sys_root=host)

    async def main() -> None:
        a = await devs.attach("c1", _spec(("/dev/xvdb", 7, 3, "rwm")))
        b = await devs.attach("c2", _spec(("/dev/data", 7, 3, "rw")))
        assert a[0].id == b[0].id and a[0].vm_path == b[0].vm_path and b[0].container_path == "/dev/data"
        assert len(hv.devices) == 1
        await devs.detach("c1")
        assert len(hv.devices) == 1  # c2 still has it
        await devs.detach("c2")
        assert hv.devices == {}
        # attached read-only first, it cannot then be given writable
        await devs.attach("c3", _spec(("/dev/xvdb", 7, 3, "r")))
        with pytest.raises(DeviceAttachError, match="already attached read-only to the sandbox for c3"):
            await devs.attach("c4", _spec(("/dev/xvdb", 7, 3, "rw")))
        await devs.detach_all()
        assert hv.devices == {} and devs.attached == {}

    trio.run(main)


def test_a_backend_without_hotplug_fails_the_container_naming_device_and_backend(host: Path) -> None:
    hv = FakeHypervisor(hotplug=False)
    hv.name, hv.vmm_label = "qemu", "QEMU microvm"
    devs = SandboxDevices(hv, "sb", sys_root=host)

    async def main() -> None:
        with pytest.raises(DeviceUnsupported) as err:
            await devs.attach("c1", _spec(("/dev/xvdb", 7, 3, "rwm")))
        msg = str(err.value)
        assert "container c1: block device /dev/xvdb (host " in msg and "loop3, 7:3)" in msg
        assert "the qemu (QEMU microvm) backend does not support block device hotplug" in msg
        assert devs.attached == {} and hv.devices == {}

    trio.run(main)


def test_a_failed_attach_detaches_what_the_container_got_before(host: Path) -> None:
    hv = FakeHypervisor(fail_on=str(host / "dev/loop4"))
    devs = SandboxDevices(hv, "sb", sys_root=host)

    async def main() -> None:
        keep = await devs.attach("c0", _spec(("/dev/shared", 7, 3, "rwm")))
        with pytest.raises(DeviceAttachError, match=r"/dev/xvdc .*hot-attaching it to the builtin .* VM failed: "
                                                     r".*did not bind"):
            await devs.attach("c1", _spec(("/dev/xvdb", 7, 3, "rwm"), ("/dev/xvdc", 7, 4, "rwm")))
        # loop3 is c0's still (c1's share of it given back); loop4 never stayed in
        assert list(hv.devices) == [keep[0].id] and devs.attached[host / "dev/loop3"].users == {"c0"}
        # numbers no host device has: refused before anything is attached
        with pytest.raises(HostDeviceError, match="7:99"):
            await devs.attach("c2", _spec(("/dev/xvdb", 7, 4, "rwm"), ("/dev/xvdc", 7, 99, "rwm")))
        assert list(hv.devices) == [keep[0].id]

    trio.run(main)


def test_a_cancelled_attach_leaves_nothing_attached(host: Path) -> None:
    class Slow(FakeHypervisor):
        async def add_device(self, dev: BlockDevice) -> None:
            await super().add_device(dev)
            if dev.path.name == "loop4":
                await trio.sleep_forever()  # the guest never answers

    hv = Slow()
    devs = SandboxDevices(hv, "sb", sys_root=host)

    async def main() -> None:
        with trio.move_on_after(0.2):
            await devs.attach("c1", _spec(("/dev/xvdb", 7, 3, "rwm"), ("/dev/xvdc", 7, 4, "rwm")))
        assert hv.devices == {} and devs.attached == {}

    trio.run(main)


def test_shim_maps_device_errors_to_clear_statuses(host: Path, tmp_path: Path) -> None:
    from katapy import config as config_mod
    from katapy.shim.errors import FailedPrecondition, InvalidArgument
    from katapy.shim.sandbox import SandboxManager

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sandbox = SandboxManager("sb", config_mod.load(None, check_files=False), nursery)
            assert await sandbox.attach_devices("c1", _spec(("/dev/xvdb", 7, 3, "rwm"))) == []  # no VM yet
            sandbox.devices = SandboxDevices(FakeHypervisor(hotplug=False), "sb", sys_root=host)
            with pytest.raises(FailedPrecondition, match="block device /dev/xvdb .* does not support"):
                await sandbox.attach_devices("c1", _spec(("/dev/xvdb", 7, 3, "rwm")))
            with pytest.raises(InvalidArgument, match="container c1: no host block device 7:77"):
                await sandbox.attach_devices("c1", _spec(("/dev/xvdb", 7, 77, "rwm")))
            with pytest.raises(InvalidArgument, match="container c1: linux.devices.0.: path must be"):
                await sandbox.attach_devices("c1", {"linux": {"devices": [{"type": "b", "path": "x"}]}})
            hv = FakeHypervisor()
            sandbox.devices = SandboxDevices(hv, "sb", sys_root=host)
            await sandbox.attach_devices("c1", _spec(("/dev/xvdb", 7, 3, "rwm")))
            await sandbox.detach_devices("c1")
            assert hv.devices == {}

    trio.run(main)


_ALL_CAPS = ["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_NET_ADMIN"]


def _privileged_spec(bounding: list[str], rules: list[dict]) -> dict:
    return {"process": {"capabilities": {"bounding": bounding}},
            "linux": {"resources": {"devices": rules},
                      "devices": [{"type": "b", "path": "/dev/sda", "major": 8, "minor": 0},
                                  {"type": "c", "path": "/dev/tty1", "major": 4, "minor": 1}]}}


@pytest.mark.parametrize(("spec", "privileged"), [
    (_privileged_spec(_ALL_CAPS, [{"allow": False, "access": "rwm"}, {"allow": True, "access": "rwm"}]), True),  # ctr --privileged
    (_privileged_spec(_ALL_CAPS, [{"allow": True, "type": "a", "major": -1, "minor": -1, "access": "rwm"}]), True),
    (_privileged_spec(["CAP_CHOWN"], [{"allow": True, "access": "rwm"}]), False),  # allow-all devices, no CAP_SYS_ADMIN
    (_privileged_spec(_ALL_CAPS, [{"allow": False, "access": "rwm"}, {"allow": True, "type": "b", "major": 8, "minor": 0,
                                                           "access": "rw"}]), False),  # --cap-add + one device
    (_privileged_spec(_ALL_CAPS, [{"allow": True, "access": "r"}]), False),
    ({"process": {}, "linux": {}}, False),
    ({"process": "x", "linux": []}, False),
])
def test_a_privileged_spec_is_recognised_as_containerd_writes_it(spec: dict, privileged: bool) -> None:
    assert is_privileged(spec) is privileged


def test_without_block_devices_keeps_the_rest_and_leaves_the_original() -> None:
    spec = _privileged_spec(_ALL_CAPS, [{"allow": True, "access": "rwm"}])
    out = without_block_devices(spec)
    assert [d["path"] for d in out["linux"]["devices"]] == ["/dev/tty1"]
    assert [d["path"] for d in spec["linux"]["devices"]] == ["/dev/sda", "/dev/tty1"]
