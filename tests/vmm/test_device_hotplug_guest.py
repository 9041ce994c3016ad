"""Device hotplug into a running Linux guest on the built-in VMM, end to end (``kvm``: on a kvm-pvm host it
runs in the nested KVM harness).

The VM boots with empty virtio-mmio slots on its command line (placeholders, DeviceID 0); the host
plugs a virtio-blk disk through ``BuiltinHypervisor.add_device`` (slot populated, upcall ADD_MMIO, the
agent binds ``virtio-mmio.<N>``).  A busybox container with the guest's /dev and /sys finds the new disk
by its size, reads the host's pattern, writes its own and reads it back; the disk is unplugged (DEL_MMIO,
the driver unbinds), the host finds the guest's bytes in the image and no fd left on it, and the disk
goes into the same slot again.  Beside it, in the next slot, a virtio-net NIC on a tap made here comes
and goes in the agent's ListInterfaces, and the tap fd the VMM held is released.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import trio

from katapy import config
from katapy.agent_client.types import Storage
from katapy.hypervisor.base import BlockDevice, NetDevice
from katapy.testing import fds
from katapy.testing.sandbox import missing_requirements, sandbox_vm

from agent.helpers import make_busybox_rootfs, make_spec, process_spec  # tests/ is on sys.path

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

DIAL_TIMEOUT_S = 240.0  # as test_builtin_resize: the L2 needs ~25 s of its own time under the harness
DISK_SECTORS = 8192  # 4 MiB: the only disk of that size in the guest
PATTERN = b"KATAPY-HOTPLUG-PATTERN"
WRITTEN = b"WRITTEN-BY-GUEST"
TAP, MAC = "khpg0", "02:00:00:00:79:02"
CID = "probe"

FIND_DISK = f"""
n=; for d in /sys/block/vd*; do [ "$(cat $d/size 2>/dev/null)" = {DISK_SECTORS} ] && n=${{d##*/}}; done
[ -n "$n" ] || {{ echo "no {DISK_SECTORS}-sector disk in: $(ls /sys/block)"; exit 3; }}
echo "disk=$n at=$(readlink -f /sys/block/$n)"
"""
USE_DISK = FIND_DISK + f"""
echo "head=$(dd if=/dev/$n bs=512 count=1 2>/dev/null | head -c {len(PATTERN)})"
echo "old=$(dd if=/dev/$n bs=512 skip=2 count=1 2>/dev/null | head -c {len(WRITTEN)})"
printf '{WRITTEN.decode()}' | dd of=/dev/$n bs=512 seek=2 conv=notrunc,fsync 2>/dev/null || exit 4
echo "back=$(dd if=/dev/$n bs=512 skip=2 count=1 2>/dev/null | head -c {len(WRITTEN)})"
"""
NO_DISK = f"""
for d in /sys/block/vd*; do [ "$(cat $d/size 2>/dev/null)" = {DISK_SECTORS} ] && {{ echo "still there: $d"; exit 5; }}; done
echo gone
"""


def _probe_spec(rootfs: str) -> dict:
    """A container that idles, with the guest's devtmpfs, a sysfs and every device allowed."""
    spec = make_spec(rootfs, ["sleep", "3600"], CID)
    spec["mounts"] = [m for m in spec["mounts"] if not m["destination"].startswith("/dev")] + [
        {"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind", "rw"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    spec["linux"]["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    return spec


async def _sh(agent, exec_id: str, script: str) -> tuple[int, str]:
    await agent.exec_process(CID, exec_id, process_spec(["sh", "-c", script]))
    out = b""
    while chunk := await agent.read_stdout(CID, exec_id, 65536):
        out += chunk
    return await agent.wait_process(CID, exec_id), out.decode(errors="replace")


def _fields(text: str) -> dict[str, str]:
    return dict(w.split("=", 1) for line in text.splitlines() for w in line.split() if "=" in w)


def _fds_to(target: str) -> int:
    return sum(1 for t in fds.snapshot().values() if t == target)


def test_hotplug_blk_and_net_into_a_running_guest(tmp_path: Path) -> None:
    cfg = config.load(check_files=False)
    cfg = dataclasses.replace(
        cfg,
        hypervisor=dataclasses.replace(cfg.hypervisor, name="builtin", shared_fs="virtio-fs"),
        agent=dataclasses.replace(cfg.agent, dial_timeout=DIAL_TIMEOUT_S),
    )
    reason = missing_requirements(cfg, backend="builtin")
    if reason:
        pytest.skip(f"cannot start a builtin sandbox VM: {reason}")
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs iproute2 and /dev/net/tun")
    from katapy.resource.network.netns import run_in_netns
    from katapy.resource.network.tap import open_queue

    img = tmp_path / "hot.img"
    img.write_bytes(PATTERN + bytes(DISK_SECTORS * 512 - len(PATTERN)))
    ns = f"katapy-hpg-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    tap_fd = -1
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"], check=True,
                       capture_output=True)
        tap_fd = run_in_netns(f"/var/run/netns/{ns}", open_queue, TAP)
        tap_target = os.readlink(f"/proc/self/fd/{tap_fd}")

        async def main() -> dict[str, object]:
            seen: dict[str, object] = {}
            async with sandbox_vm(cfg, backend="builtin") as sb:
                hv, agent, shared = sb
                make_busybox_rootfs(shared / CID / "rootfs")
                await agent.create_sandbox("hp", [], "hp", [
                    Storage("virtio-fs", "katapy-shared", "virtiofs", "/run/katapy/shared", [])])
                await agent.create_container(CID, CID, _probe_spec(f"/run/katapy/shared/{CID}/rootfs"))
                await agent.start_container(CID)
                seen["before"] = await _sh(agent, "b0", NO_DISK)

                await hv.add_device(BlockDevice("hot0", img))
                seen["base"] = hv.guest_device_address("hot0")
                seen["fds_plugged"] = _fds_to(str(img))
                seen["use1"] = await _sh(agent, "u1", USE_DISK)
                await hv.remove_device("hot0")
                seen["fds_unplugged"] = _fds_to(str(img))
                seen["image"] = img.read_bytes()[1024:1024 + len(WRITTEN)]
                seen["after"] = await _sh(agent, "a1", NO_DISK)

                await hv.add_device(BlockDevice("hot0", img))  # the emptied slot takes it again
                seen["base2"] = hv.guest_device_address("hot0")
                seen["use2"] = await _sh(agent, "u2", USE_DISK)

                # beside the disk: the next slot, with the next IOAPIC pin
                await hv.add_device(NetDevice("hotnet", TAP, MAC, tap_fd=tap_fd))
                seen["net_base"] = hv.guest_device_address("hotnet")
                seen["tap_fds_plugged"] = _fds_to(tap_target)
                seen["macs_plugged"] = [i.hw_addr.lower() for i in await agent.list_interfaces()]
                await hv.remove_device("hotnet")
                seen["tap_fds_unplugged"] = _fds_to(tap_target)
                seen["macs_unplugged"] = [i.hw_addr.lower() for i in await agent.list_interfaces()]
                await hv.remove_device("hot0")
                seen["fds_unplugged2"] = _fds_to(str(img))

                await agent.signal_process(CID, CID, 9)
                await agent.wait_process(CID, CID)
                await agent.remove_container(CID, 10)
                seen["console"] = hv.console_log()  # type: ignore[attr-defined]
            return seen

        seen = trio.run(main)
    finally:
        if tap_fd >= 0:
            os.close(tap_fd)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)

    console = str(seen["console"])[-3000:]
    assert seen["before"] == (0, "gone\n"), seen["before"]
    status, text = seen["use1"]  # type: ignore[misc]
    assert status == 0, f"{text}\nconsole:\n{console}"
    f1 = _fields(text)
    assert "virtio-mmio." in f1["at"], text  # bound on a virtio-mmio platform device
    assert f1["head"] == PATTERN.decode() and f1["old"] == "" and f1["back"] == WRITTEN.decode(), text
    assert seen["fds_plugged"] == 1 and seen["fds_unplugged"] == 0
    assert seen["image"] == WRITTEN  # the guest's write reached the host image before the unplug returned
    assert seen["after"] == (0, "gone\n"), seen["after"]
    assert seen["base2"] == seen["base"]
    status, text = seen["use2"]  # type: ignore[misc]
    assert status == 0, f"{text}\nconsole:\n{console}"
    f2 = _fields(text)
    assert f2["head"] == PATTERN.decode() and f2["old"] == WRITTEN.decode(), text  # the same image, same slot
    assert seen["fds_unplugged2"] == 0
    assert seen["net_base"] == seen["base"] + 0x1000  # type: ignore[operator]  # the next free slot
    assert seen["tap_fds_plugged"] == 2 and seen["tap_fds_unplugged"] == 1  # ours only
    assert MAC in seen["macs_plugged"], seen["macs_plugged"]  # type: ignore[operator]
    assert MAC not in seen["macs_unplugged"], seen["macs_unplugged"]  # type: ignore[operator]
    assert "Kernel panic" not in console
