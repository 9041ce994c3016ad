"""virtio-fs holds one fd per inode the guest knows: the device raises RLIMIT_NOFILE when activated.

Regression for test_fs_guest.py::test_10000_entry_listing[mmio]: in the nested KVM harness the test
process (the built-in VMM) ran with the init default of 1024/4096 open files, and a guest ``ls`` of
10,000 entries got EMFILE from the server.  Each case runs in a child process with a small limit.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

import pytest

from katapy import paths

CHILD = textwrap.dedent("""
    import errno, os, resource, sys, tempfile
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
    from tests.virtio.test_fs_unit import FsHarness
    from katapy.vmm.virtio.fs import fuse as F
    share = Path(tempfile.mkdtemp())
    n = {files}
    for i in range(n):
        (share / f"f{{i:05d}}").touch()
    h = FsHarness(share)  # activates the device
    print("limit", *resource.getrlimit(resource.RLIMIT_NOFILE))
    err, _ = h.call(F.INIT, 0, F.INIT_IN.pack(7, 38, 0, 0) + bytes(48))
    assert err == 0
    errs = {{}}
    for i in range(n):
        err, _ = h.call(F.LOOKUP, 1, f"f{{i:05d}}".encode() + b"\\0")
        errs[err] = errs.get(err, 0) + 1
    print("ok", errs.pop(0, 0), "emfile", errs.pop(-errno.EMFILE, 0), "other", sorted(errs.items()))
    h.close()
""")


def _child(soft: int, hard: int, files: int, drop_cap: bool = False) -> str:
    code = CHILD.format(soft=soft, hard=hard, files=files)
    cmd = [sys.executable, "-c", code]
    if drop_cap:
        cmd = ["setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource", *cmd]
    env = dict(os.environ, PYTHONPATH=f"{paths.REPO_ROOT}:{paths.REPO_ROOT / 'src'}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=paths.REPO_ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_lookups_beyond_the_inherited_limit_succeed():
    out = _child(256, 4096, 3000)
    assert "ok 3000 emfile 0 other []" in out, out
    soft, hard = (int(x) for x in out.split("limit ")[1].split()[:2])
    if os.geteuid() == 0:
        assert soft == hard >= 4096 and soft > 3000


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping CAP_SYS_RESOURCE from a child needs root's setpriv")
def test_without_cap_sys_resource_the_hard_limit_is_used_and_emfile_answered():
    if not any(os.access(os.path.join(d, "setpriv"), os.X_OK) for d in os.environ.get("PATH", "").split(":")):
        pytest.skip("setpriv (util-linux) is not installed")
    out = _child(256, 1024, 1500, drop_cap=True)
    assert "limit 1024 1024" in out, out
    # past the hard limit the guest gets EMFILE for the lookups that needed one more fd, nothing worse
    words = out.split("ok ")[1].split()
    ok, emfile, other = int(words[0]), int(words[2]), " ".join(words[4:])
    assert other == "[]" and emfile > 0 and ok > 900 and ok + emfile == 1500, out
