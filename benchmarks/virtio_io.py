"""virtio I/O: katapy's vhost-user back ends vs QEMU's built-in devices in one QEMU TCG guest.

    python -m benchmarks.virtio_io [--runs N] [--mib M]

One guest (QEMU TCG, microvm) gets, side by side:

* block: katapy's vhost-user-blk back end on image A vs QEMU's own
  ``virtio-blk-device`` (``cache=none,aio=threads``) on image B — two raw files of
  the same size on the same host filesystem (QEMU's image locking forbids one
  file on two devices).  Sequential O_DIRECT read/write (1 MiB requests) and
  4 KiB O_DIRECT random-read IOPS, timed in the guest by benchmarks/guest/ioguest.c.
* vsock: 64 MiB host->guest and guest->host through katapy's hybrid vsock
  (vhost-user-vsock) vs the same bytes over a host-local unix socketpair, the
  ceiling (QEMU has no built-in vsock device other than vhost-vsock, which
  needs /dev/vhost-vsock; a virtio-net comparison needs guest networking set-up
  that this image lacks).
* fs: create+stat+unlink of N files and a streaming read of a host file through
  katapy's virtio-fs (vhost-user-fs) vs QEMU's virtio-9p (``-fsdev local``,
  ``virtio-9p-device``) exporting the same host directory.

The guest kernel is the harness kernel (katapy.paths artifacts ``harness-bzImage``),
the one katapy kernel built with 9p as well as virtio-blk/vsock/fs.  Under TCG the
absolute numbers are small; the ratios are what this measures.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import Comparison, header, report

REPO = Path(__file__).resolve().parent.parent
GUEST_CID = 3
TOOL_PORT = 5000
FS_TAG = "katapy-shared"
BOOT_TIMEOUT_S = 180
VSOCK_BYTES = 64 << 20
CMD = "python -m benchmarks.virtio_io"
REPRO = CMD  # with the arguments of this run, set by main()

INIT = """#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /mnt/vfs /mnt/9p /tmp
mount -t tmpfs tmp /tmp
mount -t virtiofs {tag} /mnt/vfs || echo virtiofs mount failed
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none qemu9p /mnt/9p || echo 9p mount failed
/bin/vsocktool serve {port} &
while true; do sleep 3600; done
"""


def _kernel() -> Path | None:
    from katapy import paths

    k = paths.harness_bzimage()
    return k if k.exists() else None


class Guest:
    def __init__(self, work: Path, mib: int):
        from katapy.testing.initramfs import busybox_initramfs
        from katapy.vmm.virtio.blk import BlockDevice
        from katapy.vmm.virtio.fs import FsDevice
        from katapy.vmm.virtio.vhost_user import VhostUserServer
        from katapy.vmm.virtio.vsock import VsockDevice

        self.work = work
        tools = {}
        for name, src in (("vsocktool", REPO / "tests/virtio/guest/vsocktool.c"),
                          ("ioguest", REPO / "benchmarks/guest/ioguest.c")):
            exe = work / name
            subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(src)], check=True)
            tools[f"/bin/{name}"] = exe
        initrd = busybox_initramfs(work / "initrd.gz", INIT.format(tag=FS_TAG, port=TOOL_PORT), tools)
        self.shared = work / "shared"
        self.shared.mkdir()
        self.images = {}
        for name in ("katapy", "qemu"):
            img = work / f"{name}.img"
            with open(img, "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(1 << 20))
            self.images[name] = img
        self.vsock_uds = work / "vsock.sock"
        self.servers = [
            VhostUserServer(VsockDevice(GUEST_CID, self.vsock_uds), work / "vu-vsock.sock"),
            VhostUserServer(FsDevice(FS_TAG, self.shared), work / "vu-fs.sock"),
            VhostUserServer(BlockDevice(self.images["katapy"], read_only=False, serial="katapy"), work / "vu-blk.sock"),
        ]
        for s in self.servers:
            s.start()
        self.console = work / "console.log"
        cmd = [
            "qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off,rtc=off", "-accel", "tcg",
            "-cpu", "max", "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", f"file:{self.console}", "-kernel", str(_kernel()), "-initrd", str(initrd),
            "-append", "console=ttyS0 reboot=t panic=-1 loglevel=4",
            "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-machine", "memory-backend=mem",
            "-chardev", f"socket,id=vs,path={work / 'vu-vsock.sock'}", "-device", "vhost-user-vsock-device,chardev=vs",
            "-chardev", f"socket,id=fs,path={work / 'vu-fs.sock'}",
            "-device", f"vhost-user-fs-device,chardev=fs,tag={FS_TAG}",
            "-chardev", f"socket,id=blk,path={work / 'vu-blk.sock'}", "-device", "vhost-user-blk,chardev=blk",
            "-drive", f"file={self.images['qemu']},format=raw,if=none,id=qblk,cache=none,aio=threads",
            "-device", "virtio-blk-device,drive=qblk,serial=qemu",
            "-fsdev", f"local,id=p9,path={self.shared},security_model=none",
            "-device", "virtio-9p-device,fsdev=p9,mount_tag=qemu9p", "-no-reboot",
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(work / "qemu.out", "wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not (self.console.exists() and f"listening on {TOOL_PORT}" in self.console.read_text(errors="replace")):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited {self.proc.returncode}: {(work / 'qemu.out').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest not up in {BOOT_TIMEOUT_S} s: {self.console.read_text()[-2000:]}")
            time.sleep(0.2)

    def connect(self, port: int = TOOL_PORT, timeout: float = 300) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.vsock_uds))
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            c = s.recv(1)
            if not c:
                raise ConnectionError(f"hybrid vsock refused port {port}: {line!r}")
            line += c
        return s

    def sh(self, script: str) -> str:
        s = self.connect()
        s.sendall(b"sh " + script.encode() + b"\n")
        out = _read_all(s).decode(errors="replace")
        s.close()
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for s in self.servers:
            s.stop()


def _read_all(s: socket.socket) -> bytes:
    parts = []
    while b := s.recv(1 << 20):
        parts.append(b)
    return b"".join(parts)


def _ioguest(g: Guest, args: str) -> tuple[float, float]:
    out = g.sh(f"/bin/ioguest {args}").split()
    try:
        return float(out[-2]), float(out[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"ioguest {args}: {' '.join(out)}") from None


def _disk(g: Guest, serial: str) -> str:
    out = g.sh(f"for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = {serial} ] && echo ${{d##*/}}; done")
    name = out.strip()
    if not name:
        raise RuntimeError(f"no guest disk with serial {serial}")
    return f"/dev/{name}"


def _rate(g: Guest, args: str, runs: int, per: float = 1 << 20) -> list[float]:
    """Guest-timed rates: amount/per per second for each run."""
    out = []
    for _ in range(runs):
        g.sh("echo 3 > /proc/sys/vm/drop_caches")
        secs, amount = _ioguest(g, args)
        out.append(amount / per / secs)
    return out


def bench_blk(g: Guest, runs: int, mib: int) -> None:
    header("virtio-blk: katapy vhost-user-blk vs QEMU virtio-blk-device (guest O_DIRECT)")
    dev = {n: _disk(g, n) for n in ("katapy", "qemu")}
    size = mib << 20
    for name, args, unit, per in (
        ("seq read 1 MiB", "seqread {d} %d 1048576 1" % size, "MB/s", 1e6),
        ("seq write 1 MiB", "seqwrite {d} %d 1048576" % size, "MB/s", 1e6),
        ("rand read 4 KiB", "randread {d} 2000", "IOPS", 1.0),
    ):
        ours = _rate(g, args.format(d=dev["katapy"]), runs, per)
        ref = _rate(g, args.format(d=dev["qemu"]), runs, per)
        report(Comparison(f"blk {name}", "katapy", ours, "qemu", ref, unit=unit, command=REPRO))


def bench_vsock(g: Guest, runs: int) -> None:
    header("vsock: 64 MiB through katapy hybrid vsock vs a host unix socketpair (ceiling)")
    block = os.urandom(1 << 20)

    def h2g() -> float:
        s = g.connect()
        s.sendall(b"sink\n")
        t0 = time.perf_counter()
        for _ in range(VSOCK_BYTES // len(block)):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        count = int(_read_all(s).split()[0])
        dt = time.perf_counter() - t0
        s.close()
        assert count == VSOCK_BYTES, count
        return VSOCK_BYTES / 1e6 / dt

    def g2h() -> float:
        s = g.connect()
        t0 = time.perf_counter()
        s.sendall(f"source {VSOCK_BYTES} 7\n".encode())
        n = 0
        while b := s.recv(1 << 20):
            n += len(b)
        dt = time.perf_counter() - t0
        s.close()
        assert n == VSOCK_BYTES, n
        return VSOCK_BYTES / 1e6 / dt

    def pair() -> float:
        a, b = socket.socketpair()
        total = [0]

        def drain() -> None:
            while c := b.recv(1 << 20):
                total[0] += len(c)

        t = threading.Thread(target=drain)
        t0 = time.perf_counter()
        t.start()
        for _ in range(VSOCK_BYTES // len(block)):
            a.sendall(block)
        a.shutdown(socket.SHUT_WR)
        t.join()
        dt = time.perf_counter() - t0
        a.close()
        b.close()
        return VSOCK_BYTES / 1e6 / dt

    ref = [pair() for _ in range(runs)]
    report(Comparison("vsock host->guest 64 MiB", "katapy vsock", [h2g() for _ in range(runs)], "unix socketpair",
                      ref, unit="MB/s", command=REPRO))
    report(Comparison("vsock guest->host 64 MiB", "katapy vsock", [g2h() for _ in range(runs)], "unix socketpair",
                      ref, unit="MB/s", command=REPRO))


def bench_fs(g: Guest, runs: int, mib: int, nfiles: int) -> None:
    header("shared fs: katapy virtio-fs vs QEMU virtio-9p on the same host directory")
    with open(g.shared / "stream.bin", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    for d in ("vfs", "9p"):
        g.sh(f"mkdir -p /mnt/{d}/meta-{d}")
    ours = _rate(g, f"meta /mnt/vfs/meta-vfs {nfiles}", runs, 1.0)
    ref = _rate(g, f"meta /mnt/9p/meta-9p {nfiles}", runs, 1.0)
    report(Comparison(f"fs create+stat+unlink ({nfiles} files)", "virtio-fs", ours, "virtio-9p", ref, unit="files/s",
                      command=REPRO))
    ours = _rate(g, f"seqread /mnt/vfs/stream.bin {mib << 20} 1048576 0", runs, 1e6)
    ref = _rate(g, f"seqread /mnt/9p/stream.bin {mib << 20} 1048576 0", runs, 1e6)
    report(Comparison(f"fs streaming read {mib} MiB", "virtio-fs", ours, "virtio-9p", ref, unit="MB/s",
                      command=REPRO))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=CMD)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=32, help="block/stream size per run")
    ap.add_argument("--files", type=int, default=200)
    args = ap.parse_args(argv)
    from katapy import log

    log.configure("warning")
    for tool in ("qemu-system-x86_64", "gcc"):
        if not shutil.which(tool):
            print(f"virtio_io: skipped: {tool} is not installed")
            return 0
    if _kernel() is None:
        print("virtio_io: skipped: harness-bzImage (a kernel with virtio-blk/vsock/fs and 9p) is not built")
        return 0
    work = Path(tempfile.mkdtemp(prefix="katapy-virtio-io-"))
    g = None
    try:
        t0 = time.monotonic()
        global REPRO
        REPRO = f"{CMD} --runs {args.runs} --mib {args.mib} --files {args.files}"
        g = Guest(work, args.mib)
        print(f"guest up in {time.monotonic() - t0:.1f} s (QEMU TCG, harness kernel)", flush=True)
        bench_blk(g, args.runs, args.mib)
        bench_vsock(g, args.runs)
        bench_fs(g, args.runs, args.mib, args.files)
    finally:
        if g is not None:
            g.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
