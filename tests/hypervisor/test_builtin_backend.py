"""BuiltinHypervisor on this host's real /dev/kvm with the tiny PVH guest and the real vsock device.

A stock Linux guest needs hardware KVM (the `kvm` marker tests, run in the nested harness), but the
tiny guest runs even on kvm-pvm, so start, console, pause/resume, stop, exit reasons and teardown
of the builtin backend are checked here through katapy.vmm.api.Vmm itself.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from katapy.hypervisor.base import BlockDevice, HypervisorError, UnsupportedError, VmConfig, VmState
from katapy.hypervisor.builtin import BuiltinHypervisor
from katapy.hypervisor.builtin.backend import HOTPLUG_SLOTS, classify_exit
from katapy.hypervisor.selection import kvm_flavor

from .conftest import open_fds

pytest.importorskip("katapy.vmm.api", reason="the built-in VMM (katapy.vmm.api) is not in this tree yet")
pytest.importorskip("katapy.vmm.virtio.vsock", reason="katapy's vsock back end is not in this tree yet")
if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("no usable /dev/kvm on this host", allow_module_level=True)


def _cfg(tiny: dict[str, Path], state: Path, variant: str = "halt") -> VmConfig:
    return VmConfig("tiny", state, tiny[variant], tiny["initrd"], memory_mib=64, max_memory_mib=64)


async def _wait_console(hv: BuiltinHypervisor, text: str, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while text not in hv.console_log():
            await trio.sleep(0.01)


def test_lifecycle_leaves_nothing(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    fds_before, threads_before = open_fds(), threading.active_count()
    state = short_tmp / "sb"

    async def main() -> None:
        hv = BuiltinHypervisor(boot_protocol="pvh")
        await hv.start_vm(_cfg(tiny_guest, state))
        try:
            assert hv.state() is VmState.RUNNING
            assert hv.agent_socket() == state / "vsock.sock" and hv.agent_socket().exists()
            await _wait_console(hv, "katapy-tiny: ready")
            await hv.pause_vm()
            assert hv.state() is VmState.PAUSED
            with pytest.raises(HypervisorError, match="add_device late: VM is paused, not running"):
                await hv.add_device(BlockDevice("late", state / "console.log"))  # (hotplug: test_device_hotplug)
            await hv.resume_vm()
            assert hv.state() is VmState.RUNNING
            with pytest.raises(HypervisorError, match=r"resize_vcpus 2: out of range 1\.\.1 .*max_vcpus = 1"):
                await hv.resize_vcpus(2)
            with pytest.raises(HypervisorError, match=r"resize_memory 128 MiB: out of range 64\.\.64 MiB"):
                await hv.resize_memory(128)  # max_memory = the boot size: nothing to hot-add
            with pytest.raises(HypervisorError, match="starts one VM once"):
                await hv.start_vm(_cfg(tiny_guest, state))
            assert hv.metrics()["backend"] == "builtin"
            await hv.stop_vm()
            ended = await hv.wait_exit()
            assert ended.reason == "stopped" and ended.expected
            assert hv.state() is VmState.STOPPED
        finally:
            await hv.cleanup()
        await hv.cleanup()
        assert not state.exists()

    trio.run(main)
    assert open_fds() == fds_before
    assert threading.active_count() <= threads_before + 1  # trio's idle worker thread may linger


def test_a_dying_guest_is_an_exit_not_a_hang(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))

    async def main() -> None:
        hv = BuiltinHypervisor(boot_protocol="pvh")
        await hv.start_vm(_cfg(tiny_guest, short_tmp / "sb", "reset"))
        try:
            with trio.fail_after(10):
                ended = await hv.wait_exit()
        finally:
            await hv.cleanup()
        if kvm_flavor() == "kvm-pvm":  # PVM cannot emulate the empty-IDT fault: a KVM internal error
            assert ended.reason == "vmm-error" and "internal error" in ended.detail, ended
        else:
            assert ended.reason == "guest-reset", ended
        assert "katapy-tiny: ready" in ended.console_tail
        assert not (short_tmp / "sb").exists()

    trio.run(main)
    # a VM that ended by itself still gives back its guest memory, KVM and device fds on cleanup
    leaked = {f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}" for fd in set(os.listdir("/proc/self/fd")) - fds_before
              if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, leaked


def test_cold_plugged_disk_is_a_virtio_mmio_device(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    pytest.importorskip("katapy.vmm.virtio.blk", reason="katapy's virtio-blk back end is not in this tree yet")
    img = short_tmp / "disk.img"
    img.write_bytes(bytes(1 << 20))

    async def main() -> None:
        hv = BuiltinHypervisor(boot_protocol="pvh")
        await hv.add_device(BlockDevice("disk0", img, read_only=True))
        await hv.start_vm(_cfg(tiny_guest, short_tmp / "sb"))
        try:
            # vsock, then the disk, then the empty hotplug slots: all announced to the guest kernel
            assert hv._vmm.cmdline.count("virtio_mmio.device=4K@") == 2 + HOTPLUG_SLOTS
            assert hv.guest_device_address("disk0") == 0xD0001000
            with pytest.raises(UnsupportedError, match="remove_device disk0: it was plugged at start_vm"):
                await hv.remove_device("disk0")
        finally:
            await hv.cleanup()

    trio.run(main)


def test_vmm_build_failure_is_a_clear_error(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    fds_before = open_fds()

    async def main() -> None:
        junk = short_tmp / "not-a-kernel"
        junk.write_bytes(b"MZ" + bytes(4094))  # neither ELF nor a bzImage
        hv = BuiltinHypervisor()
        cfg = VmConfig("tiny", short_tmp / "sb", junk, tiny_guest["initrd"], memory_mib=64, max_memory_mib=64)
        with pytest.raises(HypervisorError, match="start_vm: the VMM failed"):
            await hv.start_vm(cfg)
        assert not (short_tmp / "sb").exists()
        await hv.cleanup()

    trio.run(main)
    assert open_fds() == fds_before


@pytest.mark.parametrize(
    "reason, console, expected",
    [
        ("poweroff", "", "guest-shutdown"),
        ("reset", "", "guest-reset"),
        ("triple-fault", "", "guest-reset"),
        ("reset", "[ 1.0] Kernel panic - not syncing: No working init found.\n", "guest-panic"),
        ("crash", "", "guest-panic"),
        ("error", "", "vmm-error"),
        ("stopped", "", "stopped"),
    ],
)
def test_classify_vmm_exit(reason: str, console: str, expected: str) -> None:
    from katapy.vmm.state import ExitReason
    from katapy.vmm.state import VmExit as VmmExit

    ended = classify_exit(VmmExit(ExitReason(reason), "detail"), console)
    assert ended.reason == expected
    if expected == "guest-panic" and console:
        assert ended.detail.startswith("[ 1.0] Kernel panic")
    assert classify_exit(RuntimeError("boom"), "").reason == "vmm-error"
