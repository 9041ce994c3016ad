"""Host resources running out while ``ctr run`` creates a sandbox (issue 19): the shim's state directory's
filesystem full, the shim's file descriptors exhausted.  Each run must fail with a clear error and leave
nothing; the shim's request timeout for a guest that stops answering is checked here without a guest.

Reproduce: ``.venv/bin/python -m pytest -v tests/faults``.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio

from tests.shim.containerd import PrivateContainerd

from .helpers import BOOT_TIMEOUT, IMAGE, RUNTIME, nothing_left, remove

pytestmark = [pytest.mark.containerd, pytest.mark.guest, pytest.mark.slow]
SHIM = "containerd-shim-katapy-v2"
# enough for Python and the shim to start and serve containerd, too few for a sandbox's QEMU and its
# vhost-user back ends (which take the fds QEMU sends)
FD_LIMIT = 28


def _run(c: PrivateContainerd, cid: str) -> subprocess.CompletedProcess[str]:
    return c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid, "true", check=False, timeout=BOOT_TIMEOUT)


def test_state_dir_full_fails_the_run_and_leaves_nothing(containerd: PrivateContainerd) -> None:
    """The shim's state directory (KATAPY_STATE) on a 1 MiB tmpfs that a file has filled."""
    c, cid = containerd, "kf-disk-full"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0711", "katapy-full", str(c.katapy_state)],
                   check=True)
    try:
        fill = c.katapy_state / "fill"
        with open(fill, "wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        res = _run(c, cid)
        assert res.returncode != 0
        assert "No space left on device" in res.stderr and str(c.katapy_state / cid) in res.stderr, res.stderr
        fill.unlink()
        assert not list(c.katapy_state.iterdir()), "half-created state left"
    finally:
        remove(c, cid)
        subprocess.run(["umount", "-l", str(c.katapy_state)], check=False)
    assert not nothing_left(c, cid)


def test_fd_exhaustion_fails_the_run_and_leaves_nothing(containerd: PrivateContainerd) -> None:
    """The shim (and the QEMU it starts) with a soft RLIMIT_NOFILE too low for a sandbox: the shim's wrapper
    lowers it (``ulimit -S -n``; lowering a soft limit needs no privilege)."""
    c, cid = containerd, "kf-fd"
    wrapper = c.bin / SHIM
    normal = wrapper.read_text()
    wrapper.write_text(normal.replace("exec ", f"ulimit -S -n {FD_LIMIT}; exec ", 1))
    try:
        res = _run(c, cid)
    finally:
        wrapper.write_text(normal)
        remove(c, cid)
    assert res.returncode != 0
    assert not nothing_left(c, cid)
    # the shim answers Create with the reason; it must not die and leave containerd with "ttrpc: closed"
    # (the agent-log forwarder's accept under EMFILE once took the shim down: fixed, this is its regression)
    assert "too many open files" in res.stderr.lower() and "RLIMIT_NOFILE" in res.stderr, res.stderr


def test_agent_request_that_never_returns_fails_after_request_timeout(tmp_path: Path) -> None:
    """``SandboxManager.agent_request``: a request the guest never answers ends in Unavailable after
    ``[agent] request_timeout``, not never (the regression for ``ctr run`` hanging on a stopped guest)."""
    from katapy import config as config_mod
    from katapy.shim.errors import Unavailable
    from katapy.shim.sandbox import SandboxManager

    cfg = config_mod.from_dict({"agent": {"request_timeout": 0.2},
                                "runtime": {"state_dir": str(tmp_path)}}, check_files=False)

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            sandbox = SandboxManager("kf-unit", cfg, nursery)
            t0 = trio.current_time()
            with pytest.raises(Unavailable, match=r"did not answer CreateContainer within 0.2s"):
                await sandbox.agent_request("CreateContainer", trio.sleep_forever())
            return trio.current_time() - t0

    assert 0.2 <= trio.run(main) < 2
    assert not os.listdir(tmp_path)
