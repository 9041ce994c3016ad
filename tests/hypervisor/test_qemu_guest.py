"""The product path on this host: katapy's guest kernel + image booted by the configured backend
(QEMU/TCG on kvm-pvm), the agent answering over hybrid vsock through katapy's vsock back end.

Skips, with the reason, until the guest kernel/image are built (`make kernel image`) and the
device back ends are in the tree.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from katapy import config, hypervisor
from katapy.hypervisor.base import VmState
from katapy.testing.sandbox import Sandbox, SandboxThread, missing_requirements, sandbox_vm

from .conftest import open_fds

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.guest


def _guest_config() -> config.KatapyConfig:
    """The configured setup; without virtio-fs when its back end is not in the tree yet (these
    tests check the VM and the agent channel, not the share)."""
    cfg = config.load(check_files=False)
    try:
        from katapy.vmm.virtio.fs import FsDevice  # noqa: F401
    except ImportError:
        cfg = dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, shared_fs="none"))
    return cfg


def _requirements() -> config.KatapyConfig:
    cfg = _guest_config()
    reason = missing_requirements(cfg)
    if reason:
        pytest.skip(f"cannot start a sandbox VM: {reason}")
    return cfg


@pytest.fixture(scope="module")
def shared_vm() -> Iterator[SandboxThread]:
    """One booted sandbox for the tests that only look at it (a TCG boot takes seconds)."""
    cfg = _requirements()
    st = SandboxThread(config=cfg)
    yield st
    st.close()


def _mounts() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def _qemu_children() -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    return [l for l in out.stdout.splitlines() if "qemu-system" in l]


def test_agent_health_over_hybrid_vsock(shared_vm: SandboxThread) -> None:
    async def check(sb: Sandbox) -> tuple[bool, str]:
        return await sb.agent.health_check(), await sb.agent.version()

    healthy, version = shared_vm.run(check)
    assert healthy is True
    assert version
    sb = shared_vm.sandbox
    assert sb is not None
    assert sb.hypervisor.state() is VmState.RUNNING
    assert sb.hypervisor.agent_socket().name == "vsock.sock"
    assert "katapy-agent: ready port=1024" in sb.hypervisor.console_log()  # type: ignore[attr-defined]


def test_shared_dir_reaches_the_guest_over_virtio_fs(shared_vm: SandboxThread) -> None:
    """The agent mounts the share (tag katapy-shared) when CreateSandbox asks: the guest found the
    vhost-user-fs device QEMU fronts for katapy's FsDevice, and its FUSE session works."""
    sb = shared_vm.sandbox
    assert sb is not None
    if getattr(sb.hypervisor, "cfg", None) is None or sb.hypervisor.cfg.shared_dir is None:  # type: ignore[attr-defined]
        pytest.skip("katapy.vmm.virtio.fs.FsDevice is not in this tree yet: the VM has no share")
    from katapy.agent_client.types import Storage

    share = Storage(driver="virtio-fs", source="katapy-shared", fstype="virtiofs", mount_point="/run/katapy/shared")

    async def mount(sb: Sandbox) -> None:
        await sb.agent.create_sandbox("shared-test", [], "shared-test", [share])
        await sb.agent.destroy_sandbox()

    shared_vm.run(mount)


def test_cli_sandbox_run_health() -> None:
    cfg = _requirements()
    r = subprocess.run(
        [sys.executable, "-m", "katapy.cli", "sandbox", "run", "--health", "--shared-fs", cfg.hypervisor.shared_fs],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "agent health:   SERVING" in r.stdout
    assert "agent ready:" in r.stdout and "VM start:" in r.stdout


def test_stop_leaves_no_process_socket_memfd_mount_or_temp_file(tmp_path: Path) -> None:
    cfg = _requirements()
    # other engineers' tests run on this machine at the same time: look only at what this sandbox made
    fds, qemus = open_fds(), _qemu_children()  # the shared VM's QEMU stays
    maps_before = [l for l in Path("/proc/self/maps").read_text().splitlines() if "memfd:" in l]
    state_root = tmp_path / "st"
    state_root.mkdir()
    made: dict[str, Path] = {}

    async def main() -> None:
        async with sandbox_vm(cfg, state_root=state_root, sandbox_id="leak") as sb:
            made["shared"] = sb.shared_dir
            assert await sb.agent.health_check()
            assert (state_root / "leak" / "vsock.sock").exists()
            assert len(_qemu_children()) == len(qemus) + 1 or sb.hypervisor.name == "builtin"

    trio.run(main)
    assert list(state_root.iterdir()) == []
    assert not made["shared"].exists()  # the temporary share sandbox_vm made
    assert _qemu_children() == qemus
    # only what this sandbox made counts: fds other objects close meanwhile (GC) may vanish from the set
    assert open_fds() - fds == set()
    ours = [m for m in _mounts() if str(state_root) in m or str(made["shared"]) in m]
    assert ours == []
    assert [l for l in Path("/proc/self/maps").read_text().splitlines() if "memfd:" in l] == maps_before


def test_kill_9_of_the_vmm_under_a_running_sandbox(tmp_path: Path) -> None:
    cfg = _requirements()
    if hypervisor.decide(cfg.hypervisor.name).name != "qemu":
        pytest.skip("the VMM is an external process only with the qemu backend")
    state_root = tmp_path / "st"
    state_root.mkdir()
    qemus = _qemu_children()

    async def main() -> None:
        async with sandbox_vm(cfg, state_root=state_root, sandbox_id="kill") as sb:
            qemu = sb.hypervisor.qemu  # type: ignore[attr-defined]
            os.kill(qemu.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with trio.fail_after(3):
                ended = await sb.hypervisor.wait_exit()
            assert time.monotonic() - t0 < 3
            assert ended.reason == "vmm-killed" and "SIGKILL" in ended.detail
            assert sb.hypervisor.state() is VmState.STOPPED
            with trio.fail_after(10), pytest.raises(Exception):  # the agent is gone: an error, not a hang
                await sb.agent.health_check()

    trio.run(main)
    assert list(state_root.iterdir()) == []
    assert _qemu_children() == qemus


def test_guest_panic_is_an_exit_with_the_panic_line(tmp_path: Path) -> None:
    cfg = _requirements()

    async def main() -> None:
        hv = hypervisor.select(cfg)
        vm = hypervisor.vm_config(cfg, "panic", state_dir=tmp_path / "panic", kernel_params="rdinit=/no-such-init")
        await hv.start_vm(vm)
        try:
            with trio.fail_after(120):
                ended = await hv.wait_exit()
        finally:
            await hv.cleanup()
        assert ended.reason == "guest-panic", ended
        assert "Kernel panic" in ended.detail

    trio.run(main)
    assert not (tmp_path / "panic").exists()
