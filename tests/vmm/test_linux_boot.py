"""Boot katapy's guest kernel + initramfs with the built-in VMM to the agent's readiness line.

Needs hardware-style KVM: kvm-pvm cannot run a stock Linux guest (see
docs/testing.md), so the ``kvm`` marker runs this inside the
nested KVM harness there, or skips saying why the harness cannot run.
"""
from __future__ import annotations

import pytest

from katapy import paths
from katapy.vmm.boot.loader import BootProtocol
from katapy.vmm.config import LEGACY_KERNEL_PARAMS
from tests.vmm.conftest import SerialCapture

READY = b"katapy-agent: ready"
BOOT_BOUND_S = 400  # nested under a TCG L1 on a shared 2-core host, a boot takes minutes


def _artifacts(kernel):
    for p in (kernel, paths.guest_initramfs()):
        if not p.exists():
            pytest.skip(f"{p} is not built yet (make kernel image)")
    return kernel, paths.guest_initramfs()


@pytest.mark.kvm
@pytest.mark.guest
@pytest.mark.parametrize("image", ["vmlinux", "bzImage"])
@pytest.mark.parametrize("vcpus", [1, 2])
def test_linux_boots_to_agent_ready(vmm, image, vcpus):
    kernel, initrd = _artifacts(paths.guest_vmlinux() if image == "vmlinux" else paths.guest_bzimage())
    from tests.vmm.recording_device import RecordingDevice

    out = SerialCapture()
    vmm.configure_machine(vcpus, 512)
    vmm.set_boot_source(kernel, initrd,
                        f"console=ttyS0 {LEGACY_KERNEL_PARAMS} katapy.agent_port=1024 katapy.log=info",
                        BootProtocol.LINUX64)
    vmm.add_device(RecordingDevice())  # any virtio-mmio device: the kernel registers its window
    vmm.add_serial_output(out)
    vmm.start()
    ok = out.wait_for(READY, BOOT_BOUND_S)
    text = bytes(out.data).decode(errors="replace")
    assert ok, f"no readiness line (exit: {vmm.wait(0)}):\n{text[-6000:]}"
    assert "virtio_mmio.device=4K@0xd0000000:5" in text  # the kernel echoes its command line
    if vcpus > 1:
        assert "Brought up 1 node, 2 CPUs" in text or "smp: Brought up" in text
