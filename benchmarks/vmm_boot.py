"""The built-in VMM against QEMU on the same KVM: boot to agent ready, VM creation to the first guest
instruction, and the cost of one MMIO exit (Python run loop vs QEMU vs a plain C loop).

    python -m benchmarks.vmm_boot [--runs N] [--exits N] [--here]

On a host without hardware-style KVM (kvm-pvm here) the whole benchmark re-runs itself inside the
nested KVM harness (``katapy.testing.harness``), so both VMMs always run on the same KVM; ``--here``
forbids that.  Under the harness every number is slowed by the TCG L1: read the ratios, not the times.

* boot to agent ready: katapy's guest kernel (bzImage) + image, 1 vCPU, 512 MiB, no devices, the same
  command line; from ``Vmm()`` / ``Popen`` until the console shows ``katapy-agent: ready``.
  Reference: ``qemu-system-x86_64 -M microvm -enable-kvm``.
* create to first instruction: a PVH guest whose first instruction writes 'S' to COM1; from ``Vmm()`` /
  ``Popen`` / the C program's ``open("/dev/kvm")`` until that byte.
* MMIO exit round trip: the same guest then reads an unbacked MMIO address ``--exits`` times; the time
  between 'S' and the 'D' it writes after, per exit.  Ours routes each exit through the vCPU thread's
  Python loop, the MMIO bus and a virtio-mmio register read.
"""
from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import Comparison, hardware_kvm_missing, header, in_harness, report

COMMAND = "python -m benchmarks.vmm_boot"
HERE = Path(__file__).parent / "vmm"
READY = b"katapy-agent: ready"
MMIO_ADDR = 0xD0000000  # our first virtio-mmio window; nothing in QEMU's microvm
QEMU = "qemu-system-x86_64"
QEMU_MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off"
C_LOAD_ADDR = 0x100000


def _cmdline() -> str:
    from katapy.vmm.config import LEGACY_KERNEL_PARAMS

    return f"console=ttyS0 {LEGACY_KERNEL_PARAMS} katapy.agent_port=1024 katapy.log=info quiet"


# -- the guests -------------------------------------------------------------------------------------
def build_guests(out: Path, exits: int) -> dict[str, Path]:
    """The PVH ELF (for both VMMs), its flat .text (for the C loop), and the C loop itself."""
    obj, elf, flat, loop = out / "g.o", out / "g.elf", out / "g.bin", out / "kvm_exit_loop"
    defs = ["--defsym", f"EXITS={exits}", "--defsym", f"MMIO_ADDR={MMIO_ADDR}"]
    subprocess.run(["as", "--64", *defs, "-o", str(obj), str(HERE / "exit_guest.S")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-N", "--no-warn-rwx-segments", "-Ttext", hex(C_LOAD_ADDR),
                    "--section-start=.note.pvh=0x100800", "-o", str(elf), str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(elf), str(flat)], check=True)
    subprocess.run(["gcc", "-O2", "-o", str(loop), str(HERE / "kvm_exit_loop.c")], check=True)
    return {"elf": elf, "flat": flat, "loop": loop}


class _Marks:
    """Timestamps of serial bytes as they arrive (called on a vCPU thread)."""

    def __init__(self, wanted: bytes) -> None:
        self.data = bytearray()
        self.at: dict[bytes, float] = {}
        self.wanted = wanted
        self.done = threading.Event()

    def __call__(self, chunk: bytes) -> None:
        now = time.perf_counter()
        self.data += chunk
        for m in (b"S", b"D"):
            if m in chunk and m not in self.at:
                self.at[m] = now
        if self.wanted in self.data:
            self.done.set()


# -- one sample each ---------------------------------------------------------------------------------
def ours_exits(elf: Path, disk: Path) -> tuple[float, float]:
    """(create -> 'S', 'S' -> 'D') with the built-in VMM."""
    from katapy.vmm.api import Vmm
    from katapy.vmm.boot.loader import BootProtocol
    from katapy.vmm.virtio.blk import BlockDevice

    marks = _Marks(b"D")
    t0 = time.perf_counter()
    vmm = Vmm()
    try:
        vmm.configure_machine(1, 64)
        vmm.set_boot_source(elf, None, "", BootProtocol.PVH)
        vmm.add_device(BlockDevice(disk))  # its virtio-mmio window at MMIO_ADDR answers the reads
        vmm.add_serial_output(marks)
        vmm.start()
        if not marks.done.wait(600):
            raise RuntimeError(f"built-in VMM: guest did not finish (exit {vmm.wait(0)})")
    finally:
        vmm.stop()
    return marks.at[b"S"] - t0, marks.at[b"D"] - marks.at[b"S"]


def _qemu_until(argv: list[str], wanted: bytes, timeout: float) -> tuple[float, dict[bytes, float], bytes]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    data, at = bytearray(), {}
    try:
        assert proc.stdout is not None
        while wanted not in data:
            left = timeout - (time.perf_counter() - t0)
            if left <= 0 or proc.poll() is not None and not select.select([proc.stdout], [], [], 0)[0]:
                raise RuntimeError(f"QEMU: no {wanted!r} (exit {proc.poll()}): {bytes(data[-2000:])!r}")
            if select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                now = time.perf_counter()
                for m in (b"S", b"D"):
                    if m in chunk and m not in at:
                        at[m] = now
                data += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return t0, at, bytes(data)


def qemu_base(mem_mib: int) -> list[str]:
    return [QEMU, "-M", QEMU_MACHINE, "-enable-kvm", "-cpu", "host", "-m", str(mem_mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"]


def qemu_exits(elf: Path) -> tuple[float, float]:
    t0, at, _ = _qemu_until(qemu_base(64) + ["-kernel", str(elf)], b"D", 600)
    return at[b"S"] - t0, at[b"D"] - at[b"S"]


def c_exits(g: dict[str, Path]) -> tuple[float, float]:
    out = subprocess.run([str(g["loop"]), str(g["flat"]), hex(C_LOAD_ADDR)], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    fields = dict(kv.split("=") for kv in out.split())
    return int(fields["first_ns"]) / 1e9, int(fields["loop_ns"]) / 1e9


def ours_boot(kernel: Path, initrd: Path) -> float:
    from katapy.vmm.api import Vmm
    from katapy.vmm.boot.loader import BootProtocol

    marks = _Marks(READY)
    t0 = time.perf_counter()
    vmm = Vmm()
    try:
        vmm.configure_machine(1, 512)
        vmm.set_boot_source(kernel, initrd, _cmdline(), BootProtocol.LINUX64)
        vmm.add_serial_output(marks)
        vmm.start()
        if not marks.done.wait(600):
            raise RuntimeError(f"built-in VMM: no agent readiness line (exit {vmm.wait(0)}):\n"
                               f"{bytes(marks.data[-3000:]).decode(errors='replace')}")
        return time.perf_counter() - t0
    finally:
        vmm.stop()


def qemu_boot(kernel: Path, initrd: Path) -> float:
    argv = qemu_base(512) + ["-kernel", str(kernel), "-initrd", str(initrd), "-append", _cmdline()]
    t0, _, data = _qemu_until(argv, READY, 600)
    return time.perf_counter() - t0  # _qemu_until returned right after the line arrived (plus the kill)


# -- driver --------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=COMMAND)
    p.add_argument("--runs", type=int, default=2, help="Linux boots per VMM")
    p.add_argument("--exit-runs", type=int, default=3, help="exit-loop runs per VMM")
    p.add_argument("--exits", type=int, default=20000, help="MMIO exits per run")
    p.add_argument("--here", action="store_true", help="never delegate to the nested harness")
    a = p.parse_args(argv)
    not_hw = hardware_kvm_missing()
    if not_hw and os.environ.get("KATAPY_IN_HARNESS") != "1":
        if a.here:
            print(f"vmm_boot: this host's KVM is {not_hw}: Linux guests cannot run on it (drop --here)")
            return 2
        return in_harness("vmm_boot", [x for x in argv if x != "--here"], timeout=3000)
    for tool in ("as", "ld", "objcopy", "gcc", QEMU):
        if shutil.which(tool) is None:
            print(f"vmm_boot: {tool} is not installed")
            return 2
    from katapy import paths
    from katapy.vmm.kvm.host import kvm_flavor

    where = f"KVM: {kvm_flavor()}" + (" (inside the nested harness: L1 is QEMU TCG)" if os.environ.get("KATAPY_IN_HARNESS") else "")
    with tempfile.TemporaryDirectory(prefix="vmm-bench-") as tmp:
        g = build_guests(Path(tmp), a.exits)
        disk = Path(tmp) / "disk.img"
        disk.write_bytes(bytes(1 << 20))
        header(f"VM create -> first guest instruction, and one MMIO exit round trip ({where})")
        ours = [ours_exits(g["elf"], disk) for _ in range(a.exit_runs)]
        qemu = [qemu_exits(g["elf"]) for _ in range(a.exit_runs)]
        c = [c_exits(g) for _ in range(a.exit_runs)]
        cmd = f"{COMMAND} --exits {a.exits}"
        report(Comparison("create -> first instruction", "katapy builtin (in-process)", [x[0] for x in ours],
                          "QEMU microvm (process start)", [x[0] for x in qemu], command=cmd))
        report(Comparison("create -> first instruction", "katapy builtin", [x[0] for x in ours],
                          "plain C KVM program", [x[0] for x in c], command=cmd))
        per = lambda xs: [x[1] / a.exits for x in xs]  # noqa: E731
        report(Comparison("MMIO exit round trip", "katapy Python run loop", per(ours), "QEMU", per(qemu),
                          command=cmd))
        report(Comparison("MMIO exit round trip", "katapy Python run loop", per(ours), "plain C loop", per(c),
                          command=cmd))
        kernel, initrd = paths.guest_bzimage(), paths.guest_initramfs()
        if not (kernel.exists() and initrd.exists()):
            print(f"boot to agent ready: skipped, {kernel} or {initrd} not built (make kernel image)")
            return 0
        header(f"boot to agent ready: bzImage + katapy image, 1 vCPU, 512 MiB ({where})")
        ours_b = [ours_boot(kernel, initrd) for _ in range(a.runs)]
        qemu_b = [qemu_boot(kernel, initrd) for _ in range(a.runs)]
        report(Comparison("boot to katapy-agent ready", "katapy builtin", ours_b, "QEMU microvm -enable-kvm",
                          qemu_b, command=f"{COMMAND} --runs {a.runs}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
