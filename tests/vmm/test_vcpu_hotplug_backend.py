"""BuiltinHypervisor.resize_vcpus on this host's kvm-pvm with the tiny PVH guest (no upcall server in it).

The real backend, Vmm, KVM and vsock device: the VM starts with ``vcpus`` = 1 KVM vCPU of
``max_vcpus`` = 2; a grow creates vCPU 1 and its thread, finds nobody on the guest's upcall port
(what a guest whose agent died looks like), and undoes: the thread stops, the fd stays parked,
the backend reports the count the VM has, the VM keeps running, and a retry reuses the parked fd.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from katapy.hypervisor.base import HypervisorError, VmConfig, VmState
from katapy.hypervisor.builtin import BuiltinHypervisor
from tests.hypervisor.conftest import open_fds, short_tmp, tiny_guest  # noqa: F401 - fixtures

pytest.importorskip("katapy.vmm.api", reason="the built-in VMM (katapy.vmm.api) is not in this tree yet")
if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("no usable /dev/kvm on this host", allow_module_level=True)


def _vcpu_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("katapy-vcpu") and t.is_alive())


def test_boots_with_vcpus_and_undoes_a_grow_the_guest_never_heard_of(
        tiny_guest: dict[str, Path], short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from katapy.vmm.api import Vmm

    monkeypatch.setattr(Vmm, "upcall_connect_timeout_s", 1.0)
    fds_before, threads_before = open_fds(), _vcpu_threads()

    async def main() -> None:
        hv = BuiltinHypervisor(boot_protocol="pvh")
        cfg = VmConfig("tiny", short_tmp / "sb", tiny_guest["halt"], tiny_guest["initrd"], memory_mib=64,
                       max_memory_mib=64, vcpus=1, max_vcpus=2)
        await hv.start_vm(cfg)
        try:
            with trio.fail_after(10):
                while "katapy-tiny: ready" not in hv.console_log():
                    await trio.sleep(0.01)
            vmm = hv._vmm
            assert vmm.resources.machine.max_vcpus == 2
            assert len(vmm.built.vcpus) == 1 and _vcpu_threads() == ["katapy-vcpu0"]
            for attempt in range(2):
                with pytest.raises(HypervisorError, match=r"resize_vcpus 1 -> 2: .*refused or never got ADD_CPU "
                                                          r"\[1\].*\(the VM has 1 vCPUs\)"):
                    await hv.resize_vcpus(2)
                assert hv.vcpus == 1 and vmm.vcpu_count() == 1
                assert len(vmm.built.vcpus) == 2  # created once, parked, reused by the retry
                assert _vcpu_threads() == ["katapy-vcpu0"]
                assert hv.state() is VmState.RUNNING
            assert await hv.resize_vcpus(1) == 1  # the count it has: nothing to do
        finally:
            await hv.cleanup()

    trio.run(main)
    assert _vcpu_threads() == threads_before
    leaked = open_fds() - fds_before
    assert not leaked, leaked
