"""virtio-blk on the built-in VMM's virtio-mmio transport, driven by a real Linux guest.

The guest is katapy's guest kernel with a busybox initramfs whose /init
mounts the host-made ext4 images, writes, drops its cache by remounting,
reads back, checksums, tries to write the read-only disk, prints a report
on the serial console and reboots (i8042 reset: the VM ends).  The host
then checks the report, runs e2fsck on the writable image and reads the
guest's file back with debugfs.  Needs hardware-style KVM (``kvm``: the
nested harness on kvm-pvm).
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from katapy import paths
from katapy.vmm.boot.loader import BootProtocol
from katapy.vmm.config import LEGACY_KERNEL_PARAMS, IrqChip
from katapy.vmm.state import ExitReason
from tests.vmm.conftest import SerialCapture

RO_FILE = b"read-only disk contents\n" * 1000
DONE = b"KATAPY-BLK-DONE"
BOOT_BOUND_S = 240

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for d in /sys/block/vd*; do echo "disk $(basename $d) serial=$(cat $d/serial) ro=$(cat $d/ro) size=$(cat $d/size)"; done
RW=/dev/$(grep -l katapy-rw /sys/block/vd*/serial | cut -d/ -f4)
RO=/dev/$(grep -l katapy-ro /sys/block/vd*/serial | cut -d/ -f4)
mkdir -p /mnt/rw /mnt/ro
mount -t ext4 $RW /mnt/rw && echo "rw-mounted"
dd if=/dev/urandom of=/tmp/big bs=1M count=6 2>/dev/null
cp /tmp/big /mnt/rw/big && mkdir -p /mnt/rw/d && echo hello > /mnt/rw/d/f && sync
echo "written $(md5sum /tmp/big | cut -d' ' -f1)"
umount /mnt/rw && mount -t ext4 $RW /mnt/rw
echo "readback $(md5sum /mnt/rw/big | cut -d' ' -f1) $(cat /mnt/rw/d/f)"
umount /mnt/rw && echo "rw-unmounted"
mount -t ext4 -o ro,noload $RO /mnt/ro && echo "ro-data $(md5sum /mnt/ro/data.bin | cut -d' ' -f1)"
echo x > /mnt/ro/new 2>/dev/null; echo "ro-file-write rc=$?"
dd if=/dev/zero of=$RO bs=512 count=1 2>/dev/null; echo "ro-dev-write rc=$?"
umount /mnt/ro
grep virtio /proc/interrupts | sed 's/^/interrupts /'
echo KATAPY-BLK-DONE
reboot -f
"""


def _require():
    for p in (paths.guest_bzimage(),):
        if not p.exists():
            pytest.skip(f"{p} is not built yet (make kernel)")
    for tool in ("mkfs.ext4", "e2fsck"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed on the host (e2fsprogs)")


def _ext4(path, seed=None):
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    extra = ["-d", str(seed)] if seed else []
    subprocess.run(["mkfs.ext4", "-q", "-F", *extra, str(path)], check=True, capture_output=True)


@pytest.mark.kvm
@pytest.mark.guest
@pytest.mark.parametrize("irqchip", [IrqChip.KERNEL, IrqChip.SPLIT], ids=lambda c: c.value)
def test_guest_ext4_on_builtin_virtio_blk(vmm, tmp_path, irqchip):
    """Split irqchip: the disks' completions reach Linux through katapy's IOAPIC and KVM MSI routes."""
    _require()
    from katapy.testing.initramfs import busybox_initramfs
    from katapy.vmm.virtio.blk import BlockDevice

    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "data.bin").write_bytes(RO_FILE)
    rw_img, ro_img = tmp_path / "rw.img", tmp_path / "ro.img"
    _ext4(rw_img)
    _ext4(ro_img, seed)
    ro_before = hashlib.sha256(ro_img.read_bytes()).hexdigest()
    initrd = busybox_initramfs(tmp_path / "init.cpio.gz", INIT)

    out = SerialCapture()
    vmm.configure_machine(1, 256, irqchip)
    vmm.set_boot_source(paths.guest_bzimage(), initrd, f"console=ttyS0 {LEGACY_KERNEL_PARAMS} quiet",
                        BootProtocol.LINUX64)
    vmm.add_device(BlockDevice(rw_img, serial="katapy-rw"))
    vmm.add_device(BlockDevice(ro_img, read_only=True, serial="katapy-ro"))
    vmm.add_serial_output(out)
    vmm.start()
    ended = vmm.wait(BOOT_BOUND_S)
    text = bytes(out.data).decode(errors="replace")
    assert DONE.decode() in text, f"guest script did not finish (exit {ended}):\n{text[-4000:]}"
    assert ended is not None and ended.reason is ExitReason.RESET, ended
    vmm.stop()

    lines = dict(l.split(" ", 1) for l in text.splitlines() if " " in l)
    assert "rw-mounted" in text and "rw-unmounted" in text
    written = lines["written"].split()[0]
    assert lines["readback"].split() == [written, "hello"]
    assert lines["ro-data"].strip() == hashlib.md5(RO_FILE).hexdigest()
    assert lines["ro-file-write"].strip() != "rc=0" and lines["ro-dev-write"].strip() != "rc=0"
    assert "ro=1" in text and "ro=0" in text
    # both disks' completions arrived as IO-APIC interrupts (the irqchip's own or katapy's, split)
    irq_lines = [l.split() for l in text.splitlines() if l.startswith("interrupts ")]
    assert len(irq_lines) == 2 and all("IO-APIC" in l and int(l[2]) > 0 for l in irq_lines), irq_lines
    fsck = subprocess.run(["e2fsck", "-fn", str(rw_img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    if shutil.which("debugfs"):
        data = subprocess.run(["debugfs", "-R", "cat /big", str(rw_img)], capture_output=True).stdout
        assert hashlib.md5(data).hexdigest() == written
    assert hashlib.sha256(ro_img.read_bytes()).hexdigest() == ro_before
