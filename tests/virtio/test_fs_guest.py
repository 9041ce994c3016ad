"""Acceptance: virtio-fs (katapy's FsDevice with its inline FUSE server) mounted by a real guest, over
vhost-user (QEMU's vhost-user-fs-device) or on the built-in VMM's virtio-mmio transport (conftest.py).

Every operation is done in the guest through the mount and checked on the host side of the share.
"""
from __future__ import annotations

import os
import stat

import pytest

from katapy.testing import fds

from .conftest import FS_TAG, Guest

pytestmark = [pytest.mark.guest, pytest.mark.slow]
MNT = "/mnt/shared"


@pytest.fixture(scope="module")
def fs(guest: Guest) -> Guest:
    out = guest.sh(f"mount -t virtiofs {FS_TAG} {MNT} && echo mounted-ok")
    assert "mounted-ok" in out, out
    return guest


def sh_ok(g: Guest, script: str) -> str:
    out = g.sh(f"( {script} ) && echo __OK__ || echo __FAIL__")
    assert out.rstrip().endswith("__OK__"), out
    return out


def test_create_write_read_append(fs: Guest):
    host = fs.shared_dir / "a.txt"
    sh_ok(fs, f"echo hello > {MNT}/a.txt")
    assert host.read_text() == "hello\n"
    sh_ok(fs, f"echo world >> {MNT}/a.txt")
    assert host.read_text() == "hello\nworld\n"
    out = sh_ok(fs, f"cat {MNT}/a.txt")
    assert out.startswith("hello\nworld\n")
    host.write_text("from host\n")
    assert "from host" in sh_ok(fs, f"sleep 1.2; cat {MNT}/a.txt")


def test_truncate_rename_unlink(fs: Guest):
    sh_ok(fs, f"echo 0123456789 > {MNT}/t && truncate -s 4 {MNT}/t")
    assert (fs.shared_dir / "t").read_bytes() == b"0123"
    sh_ok(fs, f"mv {MNT}/t {MNT}/t2")
    assert not (fs.shared_dir / "t").exists() and (fs.shared_dir / "t2").read_bytes() == b"0123"
    sh_ok(fs, f"rm {MNT}/t2")
    assert not (fs.shared_dir / "t2").exists()


def test_mkdir_rmdir(fs: Guest):
    sh_ok(fs, f"mkdir -p {MNT}/d1/d2 && echo x > {MNT}/d1/d2/f")
    assert (fs.shared_dir / "d1" / "d2" / "f").read_text() == "x\n"
    out = fs.sh(f"rmdir {MNT}/d1 2>&1; echo rc=$?")
    assert "rc=1" in out  # not empty
    sh_ok(fs, f"rm {MNT}/d1/d2/f && rmdir {MNT}/d1/d2 {MNT}/d1")
    assert not (fs.shared_dir / "d1").exists()


def test_symlink_readlink_link(fs: Guest):
    sh_ok(fs, f"echo data > {MNT}/target && ln -s target {MNT}/sl && ln {MNT}/target {MNT}/hard")
    assert os.readlink(fs.shared_dir / "sl") == "target"
    assert (fs.shared_dir / "hard").stat().st_ino == (fs.shared_dir / "target").stat().st_ino
    assert (fs.shared_dir / "target").stat().st_nlink == 2
    out = sh_ok(fs, f"readlink {MNT}/sl; cat {MNT}/sl")
    assert "target\ndata\n" in out


def test_chmod_chown_utimes(fs: Guest):
    sh_ok(fs, f"touch {MNT}/m && chmod 640 {MNT}/m && chown 1234:4321 {MNT}/m && touch -d '2001-02-03 04:05:06' {MNT}/m")
    st = (fs.shared_dir / "m").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert int(st.st_mtime) == 981173106


def test_large_file(fs: Guest):
    sh_ok(fs, f"dd if=/dev/urandom of=/tmp/big bs=1M count=16 2>/dev/null && cp /tmp/big {MNT}/big")
    guest_sum = sh_ok(fs, "md5sum /tmp/big").split()[0]
    import hashlib

    assert hashlib.md5((fs.shared_dir / "big").read_bytes()).hexdigest() == guest_sum
    assert sh_ok(fs, f"md5sum {MNT}/big").split()[0] == guest_sum
    os.unlink(fs.shared_dir / "big")


def test_10000_entry_listing(fs: Guest):
    d = fs.shared_dir / "many"
    d.mkdir()
    for i in range(10000):
        (d / f"f{i:05d}").touch()
    before = fds.snapshot()
    out = fs.sh(f"ls {MNT}/many | wc -l; ls {MNT}/many | tail -1", timeout=300)
    assert out.split()[:2] == ["10000", "f09999"]
    # the server (in this process) holds an O_PATH fd per inode the guest knows; once the guest
    # evicts them it sends FORGET (FUSE_FORGET / FUSE_BATCH_FORGET) and every one must be closed
    fs.sh("sync; echo 2 > /proc/sys/vm/drop_caches", timeout=120)
    fds.wait_released(before, timeout=30)


def test_escape_attempts_fail(fs: Guest, tmp_path):
    outside = fs.shared_dir.parent / "outside-file"
    outside.write_text("TOPSECRET\n")
    # a symlink pointing out of the share resolves in the guest, not on the host
    os.symlink(str(outside), fs.shared_dir / "esc")
    os.symlink("../outside-file", fs.shared_dir / "esc2")
    out = fs.sh(f"cat {MNT}/esc {MNT}/esc2 {MNT}/../outside-file 2>&1; ls {MNT}/.. ")
    assert "TOPSECRET" not in out and "No such file" in out
    sh_ok(fs, f"echo pwned > {MNT}/esc2 2>/dev/null || true")
    assert outside.read_text() == "TOPSECRET\n"


def test_statfs_and_xattr(fs: Guest):
    out = sh_ok(fs, f"df -k {MNT} | tail -1")
    assert MNT in out
