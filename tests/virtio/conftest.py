"""A real Linux guest whose virtio devices are katapy's back ends, on either transport.

The ``guest`` fixture is parametrized by transport (test ids end in ``[vhost-user]`` or ``[mmio]``):

* ``vhost-user``: QEMU TCG (microvm) fronts the devices; each back end is a
  ``VhostUserServer`` in this process.
* ``mmio`` (marked ``kvm``): katapy's own VMM (``katapy.vmm.api.Vmm``) with the
  same devices on its virtio-mmio transport, found by Linux's own virtio_mmio
  driver through ``virtio_mmio.device=`` (no vhost-user, no QEMU).  It needs
  hardware-style KVM: on this kind of host (kvm-pvm) katapy.testing.pytest_kvm
  runs these tests inside the nested KVM harness, and its summary line says
  which case ran; the fixture also prints it.

One guest per transport is booted per test session and shared (boots take seconds).
Kernel: katapy's guest kernel (``katapy.paths.guest_bzimage()``).  For
development before that exists, ``KATAPY_TEST_KERNEL=<bzImage>`` plus
``KATAPY_TEST_KMODS=<a.ko:b.ko:...>`` (insmod'ed in order) boots a distribution
kernel instead; QEMU then keeps ACPI on so a modular virtio_mmio finds the
devices.  The guest runs ``vsocktool serve 5000`` (tests/virtio/guest), which
the host drives through hybrid vsock.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from katapy import paths

HERE = Path(__file__).parent
GUEST_CID = 3
TOOL_PORT = 5000
FS_TAG = "katapy-shared"
BOOT_TIMEOUT_S = 120


def _kernel() -> tuple[Path | None, list[Path], str]:
    env = os.environ.get("KATAPY_TEST_KERNEL")
    if env:
        mods = [Path(p) for p in os.environ.get("KATAPY_TEST_KMODS", "").split(":") if p]
        return Path(env), mods, "KATAPY_TEST_KERNEL"
    k = paths.guest_bzimage()
    return (k if k.exists() else None), [], str(k)


@dataclass
class Guest:
    """The booted guest and the host ends of its devices."""

    workdir: Path
    vsock_uds: Path
    shared_dir: Path
    console: Path
    proc: subprocess.Popen | None  # QEMU (vhost-user transport)
    servers: list = field(default_factory=list)  # VhostUserServer per device (vhost-user transport)
    disks: dict = field(default_factory=dict)  # serial -> host image path (virtio-blk)
    transport: str = "vhost-user"
    vmm: Any = None  # katapy.vmm.api.Vmm (mmio transport)
    devices: list = field(default_factory=list)  # the VirtioDevices handed to the VMM (mmio transport)
    console_file: Any = None  # the console.log the VMM's serial output goes to (mmio transport)

    def connect(self, port: int = TOOL_PORT, timeout: float = 10.0) -> socket.socket:
        """Hybrid vsock: CONNECT <port>, expect OK <hostport>."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.vsock_uds))
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(1)
            if not chunk:
                s.close()
                raise ConnectionRefusedError(f"hybrid vsock: no OK for port {port} (got {line!r})")
            line += chunk
        assert line.startswith(b"OK "), line
        return s

    def command(self, cmd: str, timeout: float = 60.0) -> socket.socket:
        s = self.connect()
        s.settimeout(timeout)
        s.sendall(cmd.encode() + b"\n")
        return s

    def sh(self, script: str, timeout: float = 60.0) -> str:
        """Run a shell command in the guest; returns its combined output."""
        s = self.command("sh " + script.replace("\n", "; "), timeout)
        out = _read_all(s)
        s.close()
        return out.decode(errors="replace")

    def console_text(self) -> str:
        return self.console.read_text(errors="replace")

    def stop(self) -> None:
        """Stop QEMU (terminate, then kill after 10 s) and the back-end servers, or the built-in VMM."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for s in self.servers:
            s.stop()
        if self.vmm is not None:
            started = self.vmm.built is not None
            self.vmm.stop()  # vCPUs, KVM, guest memory and (once started) every device's fds
            if not started:  # start() failed: devices the VMM never placed are still ours (close is idempotent)
                for d in self.devices:
                    d.close()
            self.vmm = None
        if self.console_file is not None:
            self.console_file.close()
            self.console_file = None


def _read_all(s: socket.socket) -> bytes:
    parts = []
    while True:
        b = s.recv(1 << 16)
        if not b:
            return b"".join(parts)
        parts.append(b)


def _build_tool(out: Path) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed: cannot build the guest vsock test tool")
    exe = out / "vsocktool"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(HERE / "guest" / "vsocktool.c")], check=True)
    return exe


INIT = """#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /mnt/shared /tmp
mount -t tmpfs tmp /tmp
{insmods}
echo katapy-test: modules loaded
/bin/vsocktool serve {port} &
while true; do sleep 3600; done
"""


BLK_RW_SERIAL = "katapy-rw-disk"
BLK_RO_SERIAL = "katapy-ro-disk"
BLK_RO_FILE = b"read-only disk contents\n" * 1000


def _blk_images(g: Guest, work: Path) -> list[tuple[str, bool, Path]]:
    """Two ext4 images made on the host (the guest image has no mkfs.ext4): one writable, one read-only.

    Recorded in ``g.disks``; returns (serial, read_only, image) per disk, none without mkfs.ext4."""
    try:
        from katapy.vmm.virtio.blk import BlockDevice  # noqa: F401
    except ImportError:
        return []
    if not shutil.which("mkfs.ext4"):
        return []
    seed = work / "ro-seed"
    seed.mkdir()
    (seed / "data.bin").write_bytes(BLK_RO_FILE)
    out = []
    for serial, ro in ((BLK_RW_SERIAL, False), (BLK_RO_SERIAL, True)):
        img = work / f"{serial}.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        mkfs = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
        subprocess.run([*mkfs, *(["-d", str(seed)] if ro else []), str(img)], check=True, capture_output=True)
        g.disks[serial] = img
        out.append((serial, ro, img))
    return out


def _blk_disks(g: Guest, work: Path) -> list[str]:
    """The disks as vhost-user-blk back ends; QEMU's arguments for them."""
    from katapy.vmm.virtio.blk import BlockDevice
    from katapy.vmm.virtio.vhost_user import VhostUserServer

    args: list[str] = []
    for serial, ro, img in _blk_images(g, work):
        sock = work / f"vu-{serial}.sock"
        g.servers.append(VhostUserServer(BlockDevice(img, read_only=ro, serial=serial), sock))
        args += ["-chardev", f"socket,id={serial},path={sock}", "-device", f"vhost-user-blk,chardev={serial}"]
    return args


def _wait_listening(g: Guest, alive, deadline: float, why_dead) -> None:
    """Until vsocktool prints that it listens: ``alive()`` false or the deadline -> RuntimeError."""
    while True:
        if not alive():
            raise RuntimeError(f"{why_dead()}\n{g.console_text()[-3000:] if g.console.exists() else ''}")
        if g.console.exists() and f"listening on {TOOL_PORT}" in g.console_text():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"guest did not come up in {BOOT_TIMEOUT_S}s:\n{g.console_text()[-3000:]}")
        time.sleep(0.2)


def _initrd(work: Path, mods: list[Path]) -> Path:
    from katapy.testing.initramfs import busybox_initramfs

    tool = _build_tool(work)
    extra: dict[str, Path | bytes] = {"/bin/vsocktool": tool}
    insmods = []
    for m in mods:
        extra[f"/lib/kmod/{m.name}"] = m
        insmods.append(f"insmod /lib/kmod/{m.name}")
    return busybox_initramfs(work / "initrd.gz", INIT.format(insmods="\n".join(insmods), port=TOOL_PORT), extra)


@pytest.fixture(scope="session", params=["vhost-user", pytest.param("mmio", marks=pytest.mark.kvm)])
def guest(request, tmp_path_factory) -> Guest:
    kernel, mods, where = _kernel()
    if kernel is None:
        pytest.skip(f"guest kernel not built yet ({where}); set KATAPY_TEST_KERNEL to use another")
    if request.param == "mmio":
        yield from _mmio_guest(tmp_path_factory, kernel, mods)
    else:
        yield from _vhost_user_guest(tmp_path_factory, kernel, mods)


def _mmio_where() -> str:
    """Where the built-in VMM can boot Linux here (words for the report), or pytest.skip."""
    if os.environ.get("KATAPY_IN_HARNESS") == "1":
        return "built-in VMM inside the nested KVM harness (L1 under QEMU TCG, kvm_amd)"
    from katapy.vmm.kvm.host import kvm_flavor

    flavor = kvm_flavor()
    if not flavor.startswith("hardware"):
        pytest.skip(f"the built-in VMM cannot boot Linux on this host's KVM ({flavor}); "
                    "the kvm plugin runs these tests in the nested KVM harness")
    return f"built-in VMM directly on this host's hardware KVM ({flavor})"


def _mmio_guest(tmp_path_factory, kernel: Path, mods: list[Path]):
    """The same guest on katapy's own VMM: VsockDevice, FsDevice, two BlockDevices on virtio-mmio."""
    where = _mmio_where()
    from katapy.vmm.api import Vmm
    from katapy.vmm.config import LEGACY_KERNEL_PARAMS
    from katapy.vmm.virtio.blk import BlockDevice
    from katapy.vmm.virtio.fs import FsDevice
    from katapy.vmm.virtio.vsock import VsockDevice

    work = tmp_path_factory.mktemp("vm-mmio")
    t_prep = time.monotonic()
    initrd = _initrd(work, mods)
    shared = work / "shared"
    shared.mkdir()
    g = Guest(work, work / "vsock.sock", shared, work / "console.log", None, transport="mmio")
    g.vmm = Vmm()  # before the devices: Guest.stop() closes them if the VMM never took them
    try:
        images = _blk_images(g, work)
        g.devices.append(VsockDevice(GUEST_CID, g.vsock_uds))
        g.devices.append(FsDevice(FS_TAG, shared))
        for serial, ro, img in images:
            g.devices.append(BlockDevice(img, read_only=ro, serial=serial))
        g.vmm.configure_machine(1, 256)
        g.vmm.set_boot_source(kernel, initrd, f"console=ttyS0 {LEGACY_KERNEL_PARAMS} loglevel=4")
        g.console_file = open(g.console, "ab", buffering=0)  # unbuffered: the boot wait reads it
        g.vmm.add_serial_output(g.console_file.write)
        for d in g.devices:
            g.vmm.add_device(d)
        t0 = time.monotonic()
        g.vmm.start()
        _wait_listening(g, lambda: g.vmm.wait(0) is None, t0 + BOOT_TIMEOUT_S,
                        lambda: f"the VM ended: {g.vmm.wait(0)}")
        print(f"\n[guest mmio] {where}; initramfs + disks made in {t0 - t_prep:.1f} s, "
              f"vsocktool listening {time.monotonic() - t0:.1f} s after start")
        yield g
    finally:
        g.stop()


def _vhost_user_guest(tmp_path_factory, kernel: Path, mods: list[Path]):
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    from katapy.vmm.virtio.vhost_user import VhostUserServer
    from katapy.vmm.virtio.vsock import VsockDevice

    work = tmp_path_factory.mktemp("vm")
    initrd = _initrd(work, mods)
    shared = work / "shared"
    shared.mkdir()
    g = Guest(work, work / "vsock.sock", shared, work / "console.log", None)
    vsock_srv = VhostUserServer(VsockDevice(GUEST_CID, g.vsock_uds), work / "vu-vsock.sock")
    g.servers = [vsock_srv]
    fs_args: list[str] = []
    try:
        from katapy.vmm.virtio.fs import FsDevice
    except ImportError:
        FsDevice = None
    if FsDevice is not None:
        g.servers.append(VhostUserServer(FsDevice(FS_TAG, shared), work / "vu-fs.sock"))
        fs_args = ["-chardev", f"socket,id=fs,path={work / 'vu-fs.sock'}",
                   "-device", f"vhost-user-fs-device,chardev=fs,tag={FS_TAG}"]
    blk_args = _blk_disks(g, work)
    for s in g.servers:
        s.start()
    acpi = "on" if mods else "off"
    cmd = [
        "qemu-system-x86_64", "-M", f"microvm,acpi={acpi},x-option-roms=off,rtc=off", "-accel", "tcg",
        "-cpu", "max", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", f"file:{g.console}", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 reboot=t panic=-1 loglevel=4",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem",
        "-chardev", f"socket,id=vs,path={work / 'vu-vsock.sock'}", "-device", "vhost-user-vsock-device,chardev=vs",
        *fs_args, *blk_args, "-no-reboot",
    ]
    g.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(work / "qemu.out", "wb"),
                              stderr=subprocess.STDOUT)
    try:
        proc = g.proc
        _wait_listening(g, lambda: proc.poll() is None, time.monotonic() + BOOT_TIMEOUT_S,
                        lambda: f"QEMU exited {proc.returncode}: {(work / 'qemu.out').read_text()}")
        yield g
    finally:
        g.stop()
