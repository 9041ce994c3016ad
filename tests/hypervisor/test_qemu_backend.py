"""QemuHypervisor end to end with a tiny PVH guest: real QEMU, real vhost-user vsock back end.

The tiny guest does not drive virtio, but QEMU connects to katapy's vhost-user
server and negotiates with it while realizing the device, so start, control,
exit detection and teardown all go through the product's path.  Booting the
real guest and talking to the agent is in test_qemu_guest.py.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from katapy.hypervisor.base import BlockDevice, HypervisorError, UnsupportedError, VmConfig, VmState
from katapy.hypervisor.qemu import QemuHypervisor

from .conftest import QEMU, open_fds

pytest.importorskip("katapy.vmm.virtio.vhost_user", reason="katapy's vhost-user back end is not in this tree yet")
pytest.importorskip("katapy.vmm.virtio.vsock", reason="katapy's vsock back end is not in this tree yet")


def _cfg(tiny: dict[str, Path], state: Path, variant: str = "halt") -> VmConfig:
    return VmConfig("tiny", state, tiny[variant], tiny["initrd"], memory_mib=64, max_memory_mib=64)


def _memfd_maps() -> list[str]:
    return [l for l in Path("/proc/self/maps").read_text().splitlines() if "memfd:" in l]


def _qemu_children() -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    return [l for l in out.stdout.splitlines() if "qemu-system" in l]


async def _wait_console(hv: QemuHypervisor, text: str, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while text not in hv.console_log():
            await trio.sleep(0.02)


def test_start_control_stop_leaves_nothing(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    fds_before, maps_before = open_fds(), _memfd_maps()
    state = short_tmp / "sb"

    async def main() -> None:
        hv = QemuHypervisor(Path(QEMU))  # type: ignore[arg-type]
        assert hv.state() is VmState.NOT_STARTED
        await hv.start_vm(_cfg(tiny_guest, state))
        try:
            assert hv.state() is VmState.RUNNING
            assert hv.agent_socket() == state / "vsock.sock"
            with socket.socket(socket.AF_UNIX) as s:  # the hybrid-vsock listener is up
                s.connect(str(hv.agent_socket()))
            assert (state / "vhost-vsock.sock").exists()
            await _wait_console(hv, "katapy-tiny: ready")
            m = hv.metrics()
            assert m["backend"] == "qemu" and m["accel"] == "tcg" and m["rss_kib"] > 0 and m["state"] == "running"
            assert m["running_s"] >= m["spawn_s"] > 0
            await hv.pause_vm()
            assert hv.state() is VmState.PAUSED
            assert hv.qemu is not None and await hv.qemu.status() == "paused"
            with pytest.raises(HypervisorError, match="pause_vm: VM is paused, not running"):
                await hv.pause_vm()
            await hv.resume_vm()
            assert await hv.qemu.status() == "running"
            with pytest.raises(UnsupportedError, match="no hotplug"):
                await hv.add_device(BlockDevice("blk0", state / "qemu.log"))
            with pytest.raises(HypervisorError, match=r"resize_vcpus 2: out of range 1\.\.1 .*max_vcpus = 1"):
                await hv.resize_vcpus(2)
            assert await hv.resize_vcpus(1) == 1
            with pytest.raises(UnsupportedError, match="no memory hotplug .*pc-dimm needs ACPI"):
                await hv.resize_memory(128)
            with pytest.raises(HypervisorError, match="starts one VM once"):
                await hv.start_vm(_cfg(tiny_guest, state))
            pid = hv.qemu.pid
            await hv.stop_vm()
            assert hv.state() is VmState.STOPPED
            result = await hv.wait_exit()
            assert result.reason == "stopped" and result.expected
            assert not Path(f"/proc/{pid}").exists()
        finally:
            await hv.cleanup()
        await hv.cleanup()  # idempotent
        assert not state.exists()

    trio.run(main)
    assert _qemu_children() == []
    assert open_fds() == fds_before
    assert _memfd_maps() == maps_before


def test_vcpus_present_at_start_and_resize_checks(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    """-smp <max_vcpus> with the guest told maxcpus=<vcpus>; resize_vcpus checks range and state first."""
    state = short_tmp / "sb"

    async def main() -> None:
        hv = QemuHypervisor(Path(QEMU))  # type: ignore[arg-type]
        with pytest.raises(HypervisorError, match="resize_vcpus 2: the VM was never started"):
            await hv.resize_vcpus(2)
        cfg = dataclasses.replace(_cfg(tiny_guest, state), vcpus=1, max_vcpus=4)
        await hv.start_vm(cfg)
        try:
            assert hv.qemu is not None and hv.qemu.pid is not None
            argv = Path(f"/proc/{hv.qemu.pid}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"-smp") + 1] == b"4"
            assert b"maxcpus=1" in argv[argv.index(b"-append") + 1].split()
            cpus = await hv.qemu.execute("query-cpus-fast")
            assert len(cpus) == 4, cpus
            for bad in (0, 5, -1):
                with pytest.raises(HypervisorError, match=rf"resize_vcpus {bad}: out of range 1\.\.4 .*max_vcpus = 4"):
                    await hv.resize_vcpus(bad)
            assert hv.vcpus == 1
            await hv.pause_vm()
            with pytest.raises(HypervisorError, match="resize_vcpus 3: VM is paused, not running"):
                await hv.resize_vcpus(3)
            assert hv.vcpus == 1
            await hv.resume_vm()
            assert await hv.resize_vcpus(3) == 3 and hv.vcpus == 3
            assert await hv.resize_vcpus(1) == 1 and hv.vcpus == 1
            assert len(await hv.qemu.execute("query-cpus-fast")) == 4  # present all along
        finally:
            await hv.cleanup()

    trio.run(main)
    assert _qemu_children() == []


def test_kill_9_is_detected_and_state_dir_cleaned(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    state = short_tmp / "sb"

    async def main() -> None:
        hv = QemuHypervisor(Path(QEMU))  # type: ignore[arg-type]
        await hv.start_vm(_cfg(tiny_guest, state))
        try:
            assert hv.qemu is not None and hv.qemu.pid is not None
            os.kill(hv.qemu.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with trio.fail_after(3):
                result = await hv.wait_exit()
            assert time.monotonic() - t0 < 3
            assert result.reason == "vmm-killed" and "SIGKILL" in result.detail
            assert hv.state() is VmState.STOPPED
            assert "katapy-tiny" in result.console_tail or result.console_tail == ""
        finally:
            await hv.cleanup()
        assert not state.exists()

    trio.run(main)
    assert _qemu_children() == []


def test_guest_reset_ends_the_vm(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    async def main() -> None:
        hv = QemuHypervisor(Path(QEMU))  # type: ignore[arg-type]
        await hv.start_vm(_cfg(tiny_guest, short_tmp / "sb", "reset"))
        try:
            with trio.fail_after(10):
                result = await hv.wait_exit()
            assert result.reason == "guest-reset", result
            assert hv.state() is VmState.STOPPED
        finally:
            await hv.cleanup()

    trio.run(main)


def test_start_errors_are_clear_and_leave_nothing(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    fds_before = open_fds()

    async def main() -> None:
        state = short_tmp / "sb"
        cfg = _cfg(tiny_guest, state)
        with pytest.raises(HypervisorError, match="not executable"):
            await QemuHypervisor(short_tmp / "no-qemu").start_vm(cfg)
        missing = VmConfig("tiny", state, short_tmp / "nokernel", tiny_guest["initrd"], memory_mib=64, max_memory_mib=64)
        with pytest.raises(HypervisorError, match="kernel .*nokernel does not exist"):
            await QemuHypervisor(Path(QEMU)).start_vm(missing)  # type: ignore[arg-type]
        assert not state.exists()
        # another sandbox's directory is never touched
        state.mkdir()
        (state / "theirs").write_text("x")
        with pytest.raises(HypervisorError, match="already exists"):
            await QemuHypervisor(Path(QEMU)).start_vm(cfg)  # type: ignore[arg-type]
        assert (state / "theirs").read_text() == "x"
        (state / "theirs").unlink()
        state.rmdir()
        # QEMU itself refuses (the disk vanished after add_device): its words come back, all is undone
        hv = QemuHypervisor(Path(QEMU))  # type: ignore[arg-type]
        disk = short_tmp / "vanishing.img"
        disk.write_bytes(b"\0" * 4096)
        await hv.add_device(BlockDevice("blk0", disk))
        disk.unlink()
        with pytest.raises(HypervisorError, match="QEMU failed to start.*vanishing.img"):
            await hv.start_vm(cfg)
        assert not state.exists()
        assert hv.state() is VmState.STOPPED
        await hv.cleanup()
        long = VmConfig("tiny", short_tmp / ("x" * 100), tiny_guest["halt"], tiny_guest["initrd"],
                        memory_mib=64, max_memory_mib=64)
        with pytest.raises(HypervisorError, match="is too long: its unix socket paths would need"):
            await QemuHypervisor(Path(QEMU)).start_vm(long)  # type: ignore[arg-type]
        # the shim's layout for a containerd sandbox id (64 hex digits) fits
        shim_layout = VmConfig("c" * 64, Path("/run/katapy") / ("c" * 64) / "vm", tiny_guest["halt"],
                               tiny_guest["initrd"], memory_mib=64, max_memory_mib=64)
        QemuHypervisor(Path(QEMU))._check(shim_layout)  # type: ignore[arg-type]

    trio.run(main)
    assert _qemu_children() == []
    assert open_fds() == fds_before


def test_cold_plug_devices(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    img = short_tmp / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))

    async def main() -> None:
        hv = QemuHypervisor(Path(QEMU))  # type: ignore[arg-type]
        await hv.add_device(BlockDevice("blk0", img, read_only=True))
        with pytest.raises(HypervisorError, match="'blk0' exists already"):
            await hv.add_device(BlockDevice("blk0", img))
        with pytest.raises(HypervisorError, match="does not exist"):
            await hv.add_device(BlockDevice("blk1", short_tmp / "nope.img"))
        await hv.add_device(BlockDevice("blk1", img))
        await hv.remove_device("blk1")
        with pytest.raises(HypervisorError, match="no device with id 'blk1'"):
            await hv.remove_device("blk1")
        await hv.start_vm(_cfg(tiny_guest, short_tmp / "sb"))
        try:
            assert hv.qemu is not None
            blocks = await hv.qemu.execute("query-block")
            assert [b["inserted"]["ro"] for b in blocks if b.get("inserted")] == [True]
        finally:
            await hv.cleanup()

    trio.run(main)


def test_stop_while_another_task_waits_for_exit(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    """The shim watches wait_exit() in one task while another stops the VM: both end, once."""
    fds_before = open_fds()

    async def main() -> None:
        hv = QemuHypervisor(Path(QEMU))  # type: ignore[arg-type]
        await hv.start_vm(_cfg(tiny_guest, short_tmp / "sb"))
        seen = []

        async def watch() -> None:
            seen.append(await hv.wait_exit())

        try:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    nursery.start_soon(watch)
                    await trio.sleep(0.1)
                    await hv.stop_vm()
        finally:
            await hv.cleanup()
        assert [e.reason for e in seen] == ["stopped", "stopped"]
        assert seen[0] is seen[1]

    trio.run(main)
    assert open_fds() == fds_before
