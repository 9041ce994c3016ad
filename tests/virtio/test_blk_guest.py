"""Acceptance: virtio-blk (katapy's BlockDevice behind QEMU's vhost-user-blk, or on the built-in VMM's
virtio-mmio transport; see conftest.py) used by a real Linux guest.

The ext4 images are made on the host (the guest has no mkfs.ext4); the guest
mounts, writes, reads back and checksums; after the guest unmounts, the host
checks the file system with e2fsck and reads the guest's files with debugfs.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from .conftest import BLK_RO_FILE, BLK_RO_SERIAL, BLK_RW_SERIAL, Guest

pytestmark = [pytest.mark.guest, pytest.mark.slow]


def sh_ok(g: Guest, script: str, timeout: float = 120) -> str:
    out = g.sh(f"( {script} ) && echo __OK__ || echo __FAIL__", timeout)
    assert out.rstrip().endswith("__OK__"), out
    return out


def _dev(g: Guest, serial: str) -> str:
    out = g.sh("for d in /sys/block/vd*; do echo $(basename $d)=$(cat $d/serial); done")
    for line in out.split():
        name, _, ser = line.partition("=")
        if ser == serial:
            return "/dev/" + name
    pytest.fail(f"no virtio-blk disk with serial {serial} in the guest: {out!r}")


@pytest.fixture(scope="module")
def disks(guest: Guest) -> Guest:
    if not guest.disks:
        pytest.skip("virtio-blk disks not attached (mkfs.ext4 missing on the host)")
    return guest


def _fsck(img) -> subprocess.CompletedProcess:
    return subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)


def test_capacity_serial_and_ro_flag(disks: Guest):
    rw, ro = _dev(disks, BLK_RW_SERIAL), _dev(disks, BLK_RO_SERIAL)
    out = sh_ok(disks, f"cat /sys/block/{rw[5:]}/size /sys/block/{rw[5:]}/ro /sys/block/{ro[5:]}/ro")
    size, rw_ro, ro_ro = out.split()[:3]
    assert (int(size), rw_ro, ro_ro) == ((64 << 20) // 512, "0", "1")


def test_ext4_write_read_back_fsck_clean(disks: Guest):
    rw = _dev(disks, BLK_RW_SERIAL)
    out = sh_ok(disks, f"mkdir -p /mnt/rw && mount -t ext4 {rw} /mnt/rw && "
                       "dd if=/dev/urandom of=/tmp/big bs=1M count=8 2>/dev/null && cp /tmp/big /mnt/rw/big && "
                       "mkdir -p /mnt/rw/d/e && echo hello > /mnt/rw/d/e/f && sync && md5sum /tmp/big")
    guest_sum = out.split()[0]
    # drop the guest page cache: unmount and mount again, then read back from the disk
    out = sh_ok(disks, f"umount /mnt/rw && mount -t ext4 {rw} /mnt/rw && md5sum /mnt/rw/big && cat /mnt/rw/d/e/f")
    assert out.split()[0] == guest_sum and "hello" in out
    sh_ok(disks, "umount /mnt/rw")
    img = disks.disks[BLK_RW_SERIAL]
    r = _fsck(img)
    assert r.returncode == 0, r.stdout + r.stderr
    if shutil.which("debugfs"):
        data = subprocess.run(["debugfs", "-R", "cat /big", str(img)], capture_output=True).stdout
        assert hashlib.md5(data).hexdigest() == guest_sum


def test_discard_and_write_zeroes(disks: Guest):
    rw = _dev(disks, BLK_RW_SERIAL)
    img = disks.disks[BLK_RW_SERIAL]
    blocks_before = img.stat().st_blocks
    sh_ok(disks, f"mount -t ext4 {rw} /mnt/rw && rm -f /mnt/rw/big && sync && fstrim -v /mnt/rw; umount /mnt/rw")
    assert img.stat().st_blocks < blocks_before  # holes were punched in the image
    r = _fsck(img)
    assert r.returncode == 0, r.stdout + r.stderr


def test_read_only_disk_refuses_writes(disks: Guest):
    ro = _dev(disks, BLK_RO_SERIAL)
    img = disks.disks[BLK_RO_SERIAL]
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    out = sh_ok(disks, f"mkdir -p /mnt/ro && mount -t ext4 -o ro,noload {ro} /mnt/ro && md5sum /mnt/ro/data.bin")
    assert out.split()[0] == hashlib.md5(BLK_RO_FILE).hexdigest()
    out = disks.sh(f"echo x > /mnt/ro/new 2>&1; echo rc=$?; dd if=/dev/zero of={ro} bs=512 count=1 2>&1; echo rc=$?; "
                   f"mount -o remount,rw /mnt/ro 2>&1; echo rc=$?; umount /mnt/ro")
    assert out.count("rc=0") == 0, out
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
