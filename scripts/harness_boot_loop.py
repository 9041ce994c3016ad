"""Boot katapy's guest with 2 vCPUs again and again, as tests/vmm/test_linux_boot.py does, and count failures.

Run it inside the nested KVM harness (docs/testing.md):

    katapy harness --timeout 2400 -- .venv/bin/python scripts/harness_boot_loop.py 30 builtin,qemu --trace

``builtin`` boots on katapy's VMM (ELF vmlinux, Linux 64-bit boot protocol, one virtio-mmio device),
``qemu`` on ``qemu-system-x86_64 -M microvm -enable-kvm -cpu host`` with the same kernel (bzImage), initramfs
and command line, alternately.  A boot passes when the agent prints its readiness line.  ``--trace`` turns
on the L1's kvm tracepoints (exits, injected events, MSR and port accesses) and, for each failed boot,
writes the console tail and the trace's last 3000 lines to ``<out>/fail-<kind>-<i>.txt``: this is how the
L1 emulator's fault (katapy.testing.l1_watch) was found.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parents[1])]

from katapy import log  # noqa: E402

log.configure("warning")  # before the VMM modules bind their loggers

from katapy import paths  # noqa: E402
from katapy.vmm.api import Vmm  # noqa: E402
from katapy.vmm.boot.loader import BootProtocol  # noqa: E402
from katapy.vmm.config import LEGACY_KERNEL_PARAMS, IrqChip  # noqa: E402
from tests.vmm.conftest import SerialCapture  # noqa: E402
from tests.vmm.recording_device import RecordingDevice  # noqa: E402

READY = b"katapy-agent: ready"
BOUND_S = float(os.environ.get("KATAPY_BOOT_LOOP_BOUND_S", "300"))
TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("kvm_exit", "kvm_inj_exception", "kvm_inj_virq", "kvm_userspace_exit", "kvm_msr", "kvm_pio")
CMDLINE = f"console=ttyS0 {LEGACY_KERNEL_PARAMS} katapy.agent_port=1024 katapy.log=info"


class PolledCapture:
    """Serial output kept without waking anyone (the VMM's console-to-file path does the same); the loop
    polls it every 0.2 s, as it polls QEMU's output.  SerialCapture, by contrast, wakes the waiting thread
    (which rescans the whole buffer) on every byte: ~13,000 wake-ups per boot."""

    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk

    def wait_for(self, needle: bytes, timeout: float) -> bool:
        time.sleep(0.2)
        return needle in self.data


def boot_builtin_qemu_xsave() -> tuple[bool, str, str]:
    """CPUID leaf 0xD as QEMU gives it here: no PKRU state component (bit 9), sizes for x87/SSE/AVX only."""
    from katapy.vmm.boot import x86

    original = x86.vcpu_cpuid

    def vcpu_cpuid(*args, **kwargs):  # type: ignore[no-untyped-def]
        entries = original(*args, **kwargs)
        for e in entries:
            if e.function == 0xD and e.index == 0:
                e.eax &= ~(1 << 9)
                e.ecx = 0x340  # the size that x87, SSE and AVX state need
            elif e.function == 0xD and e.index == 9:
                e.eax = e.ebx = e.ecx = e.edx = 0
        return entries

    x86.vcpu_cpuid = vcpu_cpuid  # type: ignore[assignment]
    try:
        return boot_builtin()
    finally:
        x86.vcpu_cpuid = original  # type: ignore[assignment]


def boot_builtin(pit: bool = True, pic_routes: bool = True, irqchip: str = "kernel",
                 polled: bool = False, parked: bool = False) -> tuple[bool, str, str]:
    """``pit=False``: no in-kernel PIT (KVM_CREATE_PIT2 left out); ``pic_routes=False``: GSIs 0-23 routed to
    the IOAPIC only (KVM's default table also routes GSIs 0-15 to the PIC); to see what plays a part.
    ``parked=True``: the pod shape of live vCPU resize -- both vCPUs created, the guest booted with
    ``maxcpus=1`` so the second stays in wait-for-SIPI (katapy.resource.cpu)."""
    if not pit or not pic_routes:
        from katapy.vmm.kvm.vm import VmFd
        saved = VmFd.create_pit2, VmFd.create_irqchip

        def create_irqchip(self: VmFd) -> None:
            saved[1](self)
            if not pic_routes:
                self.set_gsi_routing([(gsi, 2, gsi) for gsi in range(24)])  # 2: KVM_IRQCHIP_IOAPIC

        VmFd.create_irqchip = create_irqchip  # type: ignore[method-assign]
        if not pit:
            VmFd.create_pit2 = lambda self: None  # type: ignore[method-assign]
        try:
            return boot_builtin()
        finally:
            VmFd.create_pit2, VmFd.create_irqchip = saved  # type: ignore[method-assign]
    out, vmm = (PolledCapture() if polled else SerialCapture()), Vmm()
    vmm.configure_machine(2, 512, IrqChip(irqchip))
    cmdline = CMDLINE + (" maxcpus=1" if parked else "")
    vmm.set_boot_source(paths.guest_vmlinux(), paths.guest_initramfs(), cmdline, BootProtocol.LINUX64)
    vmm.add_device(RecordingDevice())
    vmm.add_serial_output(out)
    t0 = time.monotonic()
    vmm.start()
    ok = False
    while not ok and time.monotonic() - t0 < BOUND_S and vmm.wait(0) is None:
        ok = out.wait_for(READY, 1.0)
    ended = vmm.wait(0)
    vmm.stop()
    return ok, str(ended), bytes(out.data).decode(errors="replace")


def boot_qemu(irqchip: str = "split", pit: str = "auto", memfd: bool = False) -> tuple[bool, str, str]:
    """QEMU's microvm defaults to a split irqchip (LAPIC in KVM, PIC/IOAPIC/PIT in QEMU); ``irqchip="on"`` puts
    them all in KVM, as the built-in VMM does; ``pit="off"`` leaves the PIT out; ``memfd`` backs guest RAM
    with a shared memfd, as the built-in VMM does (QEMU's default is private anonymous memory)."""
    ram = ["-object", "memory-backend-memfd,id=ram,size=512M,share=on", "-M", "memory-backend=ram"] if memfd else []
    argv = ["qemu-system-x86_64", *ram, "-M", f"microvm,acpi=off,x-option-roms=off,rtc=off,pit={pit}",
            "-accel", f"kvm,kernel-irqchip={irqchip}", "-cpu", "host",
            "-smp", "2", "-m", "512", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", str(paths.guest_bzimage()), "-initrd", str(paths.guest_initramfs()),
            "-append", CMDLINE]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    os.set_blocking(p.stdout.fileno(), False)
    data, t0 = b"", time.monotonic()
    while READY not in data and time.monotonic() - t0 < BOUND_S:
        chunk = p.stdout.read()
        if chunk:
            data += chunk
        elif p.poll() is not None:
            break
        else:
            time.sleep(0.2)
    if p.poll() is None:
        p.kill()
    rc = p.wait()
    p.stdout.close()
    return READY in data, f"qemu exit {rc}", data.decode(errors="replace")


def trace_on() -> bool:
    if not (TRACEFS / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False)
    if not (TRACEFS / "events" / "kvm").is_dir():
        print("boot-loop: no kvm tracepoints in this kernel; tracing off", flush=True)
        return False
    (TRACEFS / "buffer_size_kb").write_text("16384")
    for ev in EVENTS:
        (TRACEFS / "events" / "kvm" / ev / "enable").write_text("1")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("count", type=int)
    ap.add_argument("kinds", help="comma-separated: builtin, builtin-nopit, builtin-nopic, builtin-split, builtin-polled (serial output polled), builtin-parked (2 vCPUs, maxcpus=1: the second parked), builtin-xsave (CPUID 0xD as QEMU's), qemu, qemu-kirq (QEMU with KVM's "
                    "full irqchip), qemu-kirq-nopit, qemu-memfd (guest RAM in a shared memfd)")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/tmp"))
    ap.add_argument("--keep-consoles", action="store_true",
                    help="write every boot's console to <out>/console-<kind>-<i>.txt (to diff what the guest saw)")
    a = ap.parse_args()
    boots = {"builtin": boot_builtin, "builtin-nopit": lambda: boot_builtin(pit=False),
             "builtin-nopic": lambda: boot_builtin(pic_routes=False),
             "builtin-split": lambda: boot_builtin(irqchip="split"),
             "builtin-polled": lambda: boot_builtin(polled=True),
             "builtin-parked": lambda: boot_builtin(parked=True),
             "builtin-xsave": boot_builtin_qemu_xsave,
             "qemu": boot_qemu,
             "qemu-kirq": lambda: boot_qemu("on"), "qemu-kirq-nopit": lambda: boot_qemu("on", pit="off"),
             "qemu-memfd": lambda: boot_qemu(memfd=True)}
    kinds = a.kinds.split(",")
    tracing = a.trace and trace_on()
    failures = {k: 0 for k in kinds}
    for i in range(a.count):
        for kind in kinds:
            if tracing:
                (TRACEFS / "trace").write_text("")
            t0 = time.monotonic()
            ok, ended, console = boots[kind]()
            print(f"boot-loop: kind={kind} i={i} ok={ok} seconds={time.monotonic() - t0:.1f} ended={ended}", flush=True)
            if a.keep_consoles:
                (a.out / f"console-{kind}-{i}.txt").write_text(console)
            if not ok:
                failures[kind] += 1
                report = [f"ended: {ended}", "---- console tail", console[-8000:]]
                if tracing:
                    report += ["---- L1 trace tail", "\n".join((TRACEFS / "trace").read_text().splitlines()[-3000:])]
                (a.out / f"fail-{kind}-{i}.txt").write_text("\n".join(report))
    print("boot-loop: " + " ".join(f"{k}={failures[k]}/{a.count} failed" for k in kinds), flush=True)
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
