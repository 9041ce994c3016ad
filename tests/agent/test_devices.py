"""The agent's mmioblk devices (katapy.agent.devices) on a fake kernel tree, and through CreateContainer.

The fake tree is what a stock kernel shows for a virtio-blk disk on a
command-line virtio-mmio slot (drivers/virtio/virtio_mmio.c, drivers/block/virtio_blk.c):
``/sys/module/virtio_mmio/parameters/device`` lists the slots,
``/sys/bus/platform/devices/virtio-mmio.<id>/virtio<N>/block/<disk>/dev`` holds
``major:minor`` once the driver probed it, and ``/dev`` is where devtmpfs puts
the node (here it does not: the agent makes it).
"""
from __future__ import annotations

import copy
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import trio

from katapy.agent import devices
from katapy.agent.devices import DeviceRequest
from katapy.agent_client.types import Device
from katapy.ttrpc.errors import DeadlineExceeded, InvalidArgument, NotFound

from .helpers import AgentTarget, make_spec

PARAM = "sys/module/virtio_mmio/parameters/device"
PLATFORM = "sys/bus/platform/devices"
# three slots, as the VMM declares them (virtio_mmio.device=4K@0xd0000000:5 ...)
PARAM_TEXT = "0x1000@0xd0000000:5:0\n0x1000@0xd0001000:6:1\n0x1000@0xd0002000:7:2\n"
HOST_MAJOR = 7  # the loop devices the host attached


def _tree(root: Path) -> Path:
    (root / PARAM).parent.mkdir(parents=True)
    (root / PARAM).write_text(PARAM_TEXT)
    (root / "dev").mkdir()
    for i in range(3):
        (root / PLATFORM / f"virtio-mmio.{i}").mkdir(parents=True)
    return root


def _probe(root: Path, slot: int, disk: str, dev: str) -> None:
    """What virtio_blk's probe leaves: the disk directory, then its ``dev`` attribute."""
    d = root / PLATFORM / f"virtio-mmio.{slot}" / f"virtio{slot}" / "block" / disk
    d.mkdir(parents=True)
    (d / "dev").write_text(dev + "\n")
    (root / PLATFORM / f"virtio-mmio.{slot}" / "driver").mkdir(exist_ok=True)


def _spec(*devs: tuple[str, int, int, str]) -> dict:
    """A config.json as CRI makes it: deny-all, then one allow rule and one node per device."""
    rules = [{"allow": False, "access": "rwm"}, {"allow": True, "type": "c", "major": 1, "minor": 3,
                                                "access": "rwm"}]
    entries = [{"path": "/dev/null", "type": "c", "major": 1, "minor": 3}]
    for path, major, minor, access in devs:
        entries.append({"path": path, "type": "b", "major": major, "minor": minor, "fileMode": 0o660})
        rules.append({"allow": True, "type": "b", "major": major, "minor": minor, "access": access})
    return {"linux": {"devices": entries, "resources": {"devices": rules}}}


def _mmio(dev_id: str, base: int, path: str, kind: str = "mmioblk") -> DeviceRequest:
    return DeviceRequest(dev_id, kind, f"{base:#x}", path)


def test_spec_gets_the_guest_numbers_and_the_node_is_made(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _probe(root, 1, "vdb", "254:16")
    config = _spec(("/dev/xvdb", HOST_MAJOR, 3, "rwm"))
    before = copy.deepcopy(config)
    disks = devices.apply(config, [_mmio("d1", 0xD0001000, "/dev/xvdb")], root=root, timeout=1)
    assert [(d.name, d.major, d.minor, d.node) for d in disks] == [("vdb", 254, 16, "/dev/vdb")]
    entry = config["linux"]["devices"][1]
    assert (entry["path"], entry["major"], entry["minor"], entry["fileMode"]) == ("/dev/xvdb", 254, 16, 0o660)
    rule = config["linux"]["resources"]["devices"][2]
    assert (rule["major"], rule["minor"], rule["access"], rule["allow"]) == (254, 16, "rwm", True)
    # what is not the device stays as the host sent it
    assert config["linux"]["devices"][0] == before["linux"]["devices"][0]
    assert config["linux"]["resources"]["devices"][:2] == before["linux"]["resources"]["devices"][:2]
    st = os.stat(root / "dev" / "vdb")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (254, 16)
    # a second container of the same disk finds the node there
    again = _spec(("/dev/data", HOST_MAJOR, 3, "r"))
    devices.apply(again, [_mmio("d1", 0xD0001000, "/dev/data")], root=root, timeout=1)
    assert again["linux"]["resources"]["devices"][2]["major"] == 254


def test_two_devices_whose_numbers_cross_are_each_rewritten_once(tmp_path: Path) -> None:
    """Host 254:0 becomes guest 254:16 and host 254:16 guest 254:0: no rule is rewritten twice."""
    root = _tree(tmp_path)
    _probe(root, 0, "vda", "254:16")
    _probe(root, 2, "vdc", "254:0")
    config = _spec(("/dev/a", 254, 0, "rwm"), ("/dev/b", 254, 16, "r"))
    devices.apply(config, [_mmio("a", 0xD0000000, "/dev/a"), _mmio("b", 0xD0002000, "/dev/b")], root=root,
                  timeout=1)
    by_path = {e["path"]: (e["major"], e["minor"]) for e in config["linux"]["devices"]}
    assert by_path["/dev/a"] == (254, 16) and by_path["/dev/b"] == (254, 0)
    rules = {r["access"]: (r["major"], r["minor"]) for r in config["linux"]["resources"]["devices"][2:]}
    assert rules == {"rwm": (254, 16), "r": (254, 0)}


def test_a_disk_that_appears_late_is_waited_for(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    timer = threading.Timer(0.4, _probe, (root, 1, "vdb", "254:16"))
    timer.start()
    try:
        t0 = time.monotonic()
        disk = devices.find_disk(_mmio("d1", 0xD0001000, "/dev/xvdb"), root=root, timeout=5)
        assert disk.name == "vdb" and time.monotonic() - t0 >= 0.3
    finally:
        timer.cancel()


def test_a_disk_that_never_appears_is_a_bounded_clear_error(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"d1: virtio-mmio.1 at 0xd0001000 \(not bound to any driver\) has "
                                               r"no virtio-blk disk after 0.3 s"):
        devices.apply(_spec(("/dev/xvdb", 7, 3, "rwm")), [_mmio("d1", 0xD0001000, "/dev/xvdb")], root=root,
                      timeout=0.3)
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("dev, exc, message", [
    (DeviceRequest("d1", "vfio", "0xd0001000", "/dev/xvdb"), InvalidArgument, "unknown device type 'vfio'"),
    (DeviceRequest("d1", "mmioblk", "/dev/vdb", "/dev/xvdb"), InvalidArgument, "not a virtio-mmio base"),
    (DeviceRequest("d1", "mmioblk", "0xzz", "/dev/xvdb"), InvalidArgument, "not a hex address"),
    (DeviceRequest("d1", "mmioblk", "0xd0001000", "xvdb"), InvalidArgument, "not absolute"),
    (DeviceRequest("d1", "mmioblk", "0xe0000000", "/dev/xvdb"), NotFound, "no virtio-mmio device at 0xe0000000"),
    (DeviceRequest("d1", "mmioblk", "0xd0001000", "/dev/other"), InvalidArgument,
     "no linux.devices entry with path '/dev/other'"),
    (DeviceRequest("d1", "mmioblk", "0xd0001000", "/dev/null"), InvalidArgument, "not a block device"),
])
def test_bad_devices_get_clear_errors_and_leave_the_spec_alone(tmp_path: Path, dev, exc, message) -> None:
    root = _tree(tmp_path)
    _probe(root, 1, "vdb", "254:16")
    config = _spec(("/dev/xvdb", 7, 3, "rwm"))
    before = copy.deepcopy(config)
    with pytest.raises(exc, match=message):
        devices.apply(config, [dev], root=root, timeout=0.5)
    assert config == before


def test_a_node_with_other_numbers_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _probe(root, 1, "vdb", "254:16")
    (root / "dev" / "vdb").write_text("")
    with pytest.raises(InvalidArgument, match="is not block device 254:16"):
        devices.find_disk(_mmio("d1", 0xD0001000, "/dev/xvdb"), root=root, timeout=0.5)


def test_create_container_refuses_an_unknown_device_type(agent_target: AgentTarget) -> None:
    """Through the agent's CreateContainer: a clear error, no container made, and the id still free."""
    async def main() -> None:
        async with await agent_target.connect() as agent:
            await agent.create_sandbox("pod", [], "sb-dev", agent_target.sandbox_storages())
            rootfs = agent_target.rootfs("dev1")
            spec = make_spec(rootfs, ["sleep", "60"], "dev1")
            wanted = _spec(("/dev/xvdb", 7, 3, "rwm"))["linux"]
            spec["linux"]["devices"] = wanted["devices"]
            spec["linux"]["resources"]["devices"] = wanted["resources"]["devices"]
            with pytest.raises(InvalidArgument, match="device x1: unknown device type 'nvme'"):
                await agent.create_container("dev1", "dev1", spec,
                                             devices=[Device("x1", "nvme", "0xd0001000", "/dev/xvdb")])
            with pytest.raises(NotFound, match="device x2: no virtio-mmio device at 0xfee0f000"):
                await agent.create_container("dev1", "dev1", spec,
                                             devices=[Device("x2", "mmioblk", "0xfee0f000", "/dev/xvdb")])
            await agent.create_container("dev1", "dev1", make_spec(rootfs, ["sleep", "60"], "dev1"))
            await agent.remove_container("dev1", 10)
            details = await agent.guest_details()
            assert "mmioblk" in details.device_handlers

    trio.run(main)
