"""The guest kernel and image boot under QEMU TCG and the agent announces itself (issue 2)."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from katapy import paths

READY = b"katapy-agent: ready"
BOOT_BOUND_S = 90  # TCG on 2 shared cores: measured ~10-20 s; generous bound


@pytest.mark.guest
def test_guest_boots_to_agent_ready_under_qemu_tcg(tmp_path):
    kernel, initrd = paths.guest_bzimage(), paths.guest_initramfs()
    for p in (kernel, initrd):
        if not p.exists():
            pytest.skip(f"{p} is not built (make kernel image)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    argv = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
            "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 reboot=t panic=-1 katapy.agent_port=1024"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out = b""
    try:
        import select

        poller = select.poll()
        poller.register(proc.stdout, select.POLLIN)
        while time.monotonic() - t0 < BOOT_BOUND_S and READY not in out:
            if poller.poll(1000):
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    took = time.monotonic() - t0
    text = out.decode(errors="replace")
    assert READY in out, f"no readiness line within {BOOT_BOUND_S} s:\n{text[-4000:]}"
    assert "Linux version 6.1" in text
    print(f"agent ready after {took:.1f} s wall under TCG")
