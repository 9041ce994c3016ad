"""The nested KVM harness: run a command where /dev/kvm is hardware-style KVM.

This host's /dev/kvm is kvm-pvm, which cannot run a stock Linux guest.  QEMU's
TCG emulates AMD SVM, and KVM inside a TCG guest is real KVM, so the harness
boots an "L1" VM (katapy's harness kernel: the guest fragment + KVM + 9p) under
``qemu-system-x86_64 -M microvm -accel tcg -cpu max``, shares this host's root
read-only over virtio-9p, the project checkout and a scratch directory
read-write, chroots into the host root and runs the command there with
/dev/kvm available.  The built-in VMM then runs its guests ("L2") on the L1's
KVM exactly as it would on a hardware host.

    result = run_in_kvm_vm("python3 -c 'print(1)'", timeout=300)
    result.returncode, result.output

``katapy harness -- CMD...`` does the same from the command line.
"""
from __future__ import annotations

import argparse
import os
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from katapy import paths
from katapy.testing import l1_watch
from katapy.testing.initramfs import busybox_initramfs

EXIT_MARKER = "KATAPY-HARNESS-EXIT"
QEMU = "qemu-system-x86_64"
# `max` emulates AMD SVM (KVM in the L1 loads kvm_amd).
HARNESS_CPU = "max"


def host_tsc_khz() -> int | None:
    """This host's TSC frequency, which is what TCG's rdtsc counts at (it reads the host TSC).

    The L1 kernel is told it (``tsc_early_khz=``) because its own calibration against the PIT fails when the
    host is busy ("tsc: Unable to calibrate against PIT ... Marking TSC unstable"): tsc_khz is then 0, and
    KVM_RUN in the L1 spins on KVM_REQ_CLOCK_UPDATE forever without entering the guest (measured: every
    raw-KVM program hung in KVM_RUN; with the frequency given, all ran).
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


def kernel_cmdline() -> str:
    khz = host_tsc_khz()
    tsc = f" tsc_early_khz={khz} tsc=reliable" if khz else ""
    return "console=ttyS0 reboot=t panic=-1 quiet loglevel=3" + tsc + " " + os.environ.get("KATAPY_HARNESS_APPEND", "")
# tmpfs mounts inside the chroot, where the command may write
WRITABLE = ("/tmp", "/run", "/var/lib/containerd", "/var/lib/cni", "/var/run/netns", "/root/.cache", "/var/tmp")


class HarnessError(Exception):
    pass


@dataclass
class HarnessResult:
    returncode: int
    output: str  # the command's output (serial console, kernel noise trimmed)
    console: str  # the whole L1 console
    seconds: float
    timed_out: bool = False
    files: dict[str, bytes] = field(default_factory=dict)  # what the command left in /run/katapy-harness
    qemu_pid: int = 0
    # what the L1 watch caught: L2 exits at the L1's own post-VMRUN address (the L1 emulator's fault), L2 shutdowns
    l1_caught: list[l1_watch.CaughtExit] = field(default_factory=list)


_WATCH: dict[Path, tuple[float, tuple[int, ...]]] = {}


def _watch_addresses() -> tuple[int, ...]:
    """Post-VMRUN addresses of the harness kernel (cached per build); () when its ELF is not there."""
    vmlinux = paths.harness_vmlinux()
    try:
        mtime = vmlinux.stat().st_mtime
    except OSError:
        return ()
    cached = _WATCH.get(vmlinux)
    if cached is None or cached[0] != mtime:
        cached = (mtime, l1_watch.vmrun_resume_addresses(vmlinux))
        _WATCH[vmlinux] = cached
    return cached[1]


def _init_script(workdir: str) -> str:
    tmpfs = "\n".join(
        f"mkdir -p /host{d} 2>/dev/null; mount -t tmpfs -o mode=1777 tmpfs /host{d} 2>/dev/null || true" for d in WRITABLE
    )
    return f"""#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /host /harness
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,ro,cache=loose hostroot /host || echo "harness: cannot mount host root"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 harness /harness
for d in proc sys dev; do mount -o bind /$d /host/$d; done
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup 2>/dev/null
{tmpfs}
mkdir -p /host/run/katapy-harness
mount -o bind /harness /host/run/katapy-harness
mkdir -p /host{workdir} 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 work /host{workdir}
ip link set lo up
echo "harness: kvm=$(ls /dev/kvm 2>/dev/null) cpu=$(grep -o -m1 -w -e svm -e vmx /proc/cpuinfo)"
{l1_watch.init_setup(_watch_addresses())}
echo "KATAPY-HARNESS-BEGIN"
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \\
    TERM=dumb KATAPY_IN_HARNESS=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \\
    /bin/sh -c 'cd {shlex.quote(workdir)} && exec /bin/sh /run/katapy-harness/cmd.sh' </dev/console 2>&1
rc=$?
{l1_watch.init_collect("/harness")}
echo "{EXIT_MARKER} $rc"
sync
reboot -f
"""


def harness_kernel() -> Path:
    k = paths.harness_bzimage()
    if not k.exists():
        raise HarnessError(f"harness kernel {k} is missing: run `make kernel` (katapy osbuilder kernel --flavor harness)")
    return k


def available() -> tuple[bool, str]:
    """Whether the harness can run here, and if not why."""
    if shutil.which(QEMU) is None:
        return False, f"{QEMU} is not installed"
    if not paths.harness_bzimage().exists():
        return False, f"harness kernel {paths.harness_bzimage()} has not been built (make kernel)"
    return True, "ok"


def run_in_kvm_vm(
    cmd: str | list[str],
    timeout: float = 600,
    workdir: Path | None = None,
    memory_mib: int = 2048,
    cpus: int = int(os.environ.get("KATAPY_HARNESS_CPUS", "2")),
    stream: bool = False,
    files: dict[str, bytes] | None = None,
) -> HarnessResult:
    """Boot the L1 VM, run ``cmd`` (shell text or argv) in the host root with /dev/kvm; kill the VM on timeout.

    ``workdir`` (default: the project checkout) is shared read-write at the same
    path and is the command's cwd.  ``files`` are written to the scratch dir,
    visible to the command as /run/katapy-harness/<name>.
    """
    kernel = harness_kernel()
    workdir = (workdir or paths.REPO_ROOT).resolve()
    for d in WRITABLE:  # the L1 sees the host root read-only: a tmpfs can only go on a directory that exists
        try:
            os.makedirs(d, exist_ok=True)
        except OSError:
            pass
    text = cmd if isinstance(cmd, str) else shlex.join(cmd)
    with tempfile.TemporaryDirectory(prefix="katapy-harness-") as tmp:
        scratch = Path(tmp) / "share"
        scratch.mkdir()
        (scratch / "cmd.sh").write_text(text + "\n")
        for name, data in (files or {}).items():
            (scratch / name).write_bytes(data)
        initrd = busybox_initramfs(Path(tmp) / "l1-init.cpio.gz", _init_script(str(workdir)))
        argv = [
            QEMU, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
            "-accel", os.environ.get("KATAPY_HARNESS_ACCEL", "tcg"), "-cpu", os.environ.get("KATAPY_HARNESS_CPU", HARNESS_CPU), "-m", str(memory_mib), "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", kernel_cmdline(),
            "-fsdev", "local,id=hr,path=/,security_model=passthrough,readonly=on,multidevs=remap",
            "-device", "virtio-9p-device,fsdev=hr,mount_tag=hostroot",
            "-fsdev", f"local,id=wk,path={workdir},security_model=passthrough,multidevs=remap",
            "-device", "virtio-9p-device,fsdev=wk,mount_tag=work",
            "-fsdev", f"local,id=hx,path={scratch},security_model=passthrough",
            "-device", "virtio-9p-device,fsdev=hx,mount_tag=harness",
        ]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        chunks: list[bytes] = []
        timed_out = False
        assert proc.stdout is not None
        poller = select.poll()  # not select(): the caller (a pytest run) may hold fds past FD_SETSIZE
        poller.register(proc.stdout, select.POLLIN)
        try:
            while True:
                left = timeout - (time.monotonic() - t0)
                if left <= 0:
                    timed_out = True
                    break
                if poller.poll(int(min(left, 1.0) * 1000)):
                    data = os.read(proc.stdout.fileno(), 65536)
                    if not data:
                        break
                    chunks.append(data)
                    if stream:
                        sys.stdout.write(data.decode(errors="replace"))
                        sys.stdout.flush()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        console = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
        seconds = time.monotonic() - t0
        result = _result(console, seconds, timed_out, proc.returncode)
        result.qemu_pid = proc.pid
        for f in (scratch.iterdir() if scratch.is_dir() else ()):
            if f.is_file() and f.name != "cmd.sh" and f.name not in (files or {}):
                result.files[f.name] = f.read_bytes()
        trace = result.files.pop(l1_watch.TRACE_FILE, b"")
        result.l1_caught = l1_watch.parse(trace.decode(errors="replace"), _watch_addresses())
        return result


def _result(console: str, seconds: float, timed_out: bool, qemu_rc: int) -> HarnessResult:
    begin = console.find("KATAPY-HARNESS-BEGIN\n")
    body = console[begin + len("KATAPY-HARNESS-BEGIN\n"):] if begin >= 0 else console
    rc = -1
    end = body.rfind(EXIT_MARKER)
    if end >= 0:
        try:
            rc = int(body[end + len(EXIT_MARKER):].split()[0])
        except (ValueError, IndexError):
            rc = -1
        body = body[:end]
    elif not timed_out:
        body += f"\n[harness: the L1 VM ended without an exit status (qemu exit {qemu_rc})]"
    if timed_out:
        body += "\n[harness: timed out; L1 VM killed]"
    return HarnessResult(rc if not timed_out else -1, body, console, seconds, timed_out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="katapy harness", description="Run a command inside the nested KVM harness VM.")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--memory", type=int, default=2048, help="L1 memory in MiB")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="command (after --)")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("no command given")
    try:
        r = run_in_kvm_vm(cmd, timeout=a.timeout, memory_mib=a.memory, stream=True)
    except HarnessError as exc:
        print(f"katapy harness: {exc}", file=sys.stderr)
        return 2
    if EXIT_MARKER not in r.console:
        why = "timed out; L1 VM killed" if r.timed_out else "the L1 VM ended without an exit status (it reset or was killed)"
        print(f"\n[harness: {why}]", file=sys.stderr)
    for caught in r.l1_caught:
        print(f"[harness: {caught.describe()}]", file=sys.stderr)
    print(f"\n[harness: exit {r.returncode} after {r.seconds:.1f} s]", file=sys.stderr)
    return r.returncode if r.returncode >= 0 else 1
