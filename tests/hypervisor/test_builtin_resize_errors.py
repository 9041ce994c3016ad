"""Bad resize requests to the builtin backend: clear errors, nothing half-done, the VM keeps running.

The tiny PVH guest runs on this host's kvm-pvm, so these go through the real BuiltinHypervisor, the
real ``katapy.vmm.api.Vmm``, real KVM memory slots and the real vsock device.  The tiny guest has no
vsock driver and so no upcall server: every hotplug request finds nobody listening on port 0xDB,
which is what a guest whose agent died (or never started its upcall service) looks like to the VMM.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from katapy.hypervisor.base import HypervisorError, VmConfig, VmState
from katapy.hypervisor.builtin import BuiltinHypervisor

from .conftest import open_fds

pytest.importorskip("katapy.vmm.api", reason="the built-in VMM (katapy.vmm.api) is not in this tree yet")
if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("no usable /dev/kvm on this host", allow_module_level=True)

BOOT_MIB = 64
MAX_MIB = BOOT_MIB + 256  # two 128 MiB hotplug blocks above the boot RAM
MAX_VCPUS = 2


def _cfg(tiny: dict[str, Path], state: Path) -> VmConfig:
    return VmConfig("tiny", state, tiny["halt"], tiny["initrd"], memory_mib=BOOT_MIB, max_memory_mib=MAX_MIB,
                    vcpus=1, max_vcpus=MAX_VCPUS)


async def _started(tiny: dict[str, Path], state: Path) -> BuiltinHypervisor:
    hv = BuiltinHypervisor(boot_protocol="pvh")
    await hv.start_vm(_cfg(tiny, state))
    with trio.fail_after(10):
        while "katapy-tiny: ready" not in hv.console_log():
            await trio.sleep(0.01)
    return hv


def _slots(hv: BuiltinHypervisor) -> int:
    """KVM memory slots the VM has now (boot RAM + hot-added blocks)."""
    built = hv._vmm.built
    assert built is not None
    return len(built.mem.regions)


def test_out_of_range_and_paused_resizes_change_nothing(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    async def main() -> None:
        hv = await _started(tiny_guest, short_tmp / "sb")
        try:
            slots = _slots(hv)
            for mib, why in ((MAX_MIB + 128, r"out of range 64\.\.320 MiB"), (0, r"out of range 64\.\.320 MiB"),
                             (BOOT_MIB - 1, r"out of range 64\.\.320 MiB")):
                with pytest.raises(HypervisorError, match=why):
                    await hv.resize_memory(mib)
            # not a whole 128 MiB block above the boot RAM
            with pytest.raises(HypervisorError, match="multiple of 128 MiB"):
                await hv.resize_memory(BOOT_MIB + 100)
            await hv.pause_vm()
            with pytest.raises(HypervisorError, match="VM is paused, not running"):
                await hv.resize_memory(MAX_MIB)
            with pytest.raises(HypervisorError, match="VM is paused, not running"):
                await hv.resize_vcpus(MAX_VCPUS)
            await hv.resume_vm()
            for n in (0, MAX_VCPUS + 1, 255):
                with pytest.raises(HypervisorError, match=r"out of range 1\.\.2"):
                    await hv.resize_vcpus(n)
            assert hv.memory_mib == BOOT_MIB and hv.vcpus == 1
            assert _slots(hv) == slots
            assert hv.state() is VmState.RUNNING
        finally:
            await hv.cleanup()

    trio.run(main)


def test_a_guest_without_an_upcall_server_gets_a_clear_error_and_no_slot(
        tiny_guest: dict[str, Path], short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from katapy.vmm.api import Vmm

    monkeypatch.setattr(Vmm, "upcall_connect_timeout_s", 1.0)
    fds_before = open_fds()

    async def main() -> None:
        hv = await _started(tiny_guest, short_tmp / "sb")
        try:
            slots = _slots(hv)
            for _ in range(2):  # the second try reconnects from scratch and fails the same way
                with pytest.raises(HypervisorError, match=r"resize_memory 64 -> 320 MiB: .*refused or never got "
                                                          r"ADD_MEM.*the slots were removed"):
                    await hv.resize_memory(MAX_MIB)
                assert hv.memory_mib == BOOT_MIB
                assert _slots(hv) == slots  # the memfds and KVM slots made for the request are gone again
                assert hv.state() is VmState.RUNNING
            assert "katapy-tiny: ready" in hv.console_log()
        finally:
            await hv.cleanup()

    trio.run(main)
    leaked = open_fds() - fds_before
    assert not leaked, leaked
