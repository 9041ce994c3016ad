"""Faults of a sandbox's VM, through containerd and ``ctr`` (issue 19): its VMM killed, a guest that never
answers, a guest kernel panic.  Each asserts what containerd sees, then that nothing is left.

The guest is real (katapy's kernel and image under the configured backend: QEMU microvm under TCG on a
host without usable KVM).  Reproduce: ``.venv/bin/python -m pytest -v tests/faults``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.shim.containerd import PrivateContainerd, wait_status

from .helpers import (BOOT_TIMEOUT, IMAGE, RUNTIME, nothing_left, qemu_backend, qmp, console_tail, recorded_vmm_pid, remove,
                      resume_and_kill, shim_log_since, vmm_pid, wait_console, write_config)

pytestmark = [pytest.mark.containerd, pytest.mark.guest, pytest.mark.slow]
STUCK_TIMEOUT_S = 10.0  # the dial and request timeouts the stuck-guest tests configure
TEARDOWN_S = 30.0  # a stopped QEMU: QMP quit unanswered (5 s), the grace for its exit (5 s), then SIGKILL
# microvm has no NMI status port: the guest reads 0x61 as 0xff and takes the NMI for a PCI SERR, which
# panic_on_unrecovered_nmi panics on; unknown_nmi_panic covers a machine whose port reads 0
NMI_PANICS = "unknown_nmi_panic=1 sysctl.kernel.panic_on_unrecovered_nmi=1"
DETECT_S = 10.0  # a dead VM must be seen in this time (measured: well under a second, plus ctr's polling)


@pytest.fixture(autouse=True)
def _need_qemu() -> None:
    if not qemu_backend():
        pytest.skip("these faults act on the qemu backend's QEMU process and QMP")


class Events:
    """``ctr events`` running for the whole test: what containerd received."""

    def __init__(self, c: PrivateContainerd) -> None:
        self.proc = subprocess.Popen(["ctr", "--address", c.address, "events"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=c.env(), text=True)
        time.sleep(0.5)  # let ctr subscribe

    def stop(self) -> list[str]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out.splitlines()


@pytest.fixture
def events(containerd: PrivateContainerd) -> Iterator[Events]:
    ev = Events(containerd)
    try:
        yield ev
    finally:
        if ev.proc.poll() is None:
            ev.stop()


def _run_detached(c: PrivateContainerd, cid: str, config: Path) -> None:
    c.ctr("run", "-d", "--runtime", RUNTIME, "--runtime-config-path", str(config), IMAGE, cid, "sleep", "600",
          timeout=BOOT_TIMEOUT)


def _vm_ends(c: PrivateContainerd, cid: str, events: Events, fault: str, inject) -> tuple[float, list[str]]:
    """Inject the fault that ends ``cid``'s VM; return (seconds until ``ctr task ls`` shows STOPPED, the
    task's exit events), after ``ctr task delete`` and ``containers rm`` have worked."""
    t0 = time.monotonic()
    inject()
    assert wait_status(c, cid, "STOPPED", DETECT_S), f"{fault}: {c.ctr('task', 'ls').stdout}{console_tail(c, cid)}"
    detected = time.monotonic() - t0
    deleted = c.ctr("task", "delete", cid)
    assert "exit code 255" in deleted.stderr, deleted  # vm_lost: every process of a lost VM exits 255
    c.ctr("containers", "rm", cid)
    exits = [ln for ln in events.stop() if "/tasks/exit" in ln and f'"id":"{cid}"' in ln]
    print(f"{fault}: STOPPED {detected:.2f} s after the fault")
    return detected, exits


def test_kill_9_of_qemu_exits_the_task_and_tears_the_sandbox_down(containerd: PrivateContainerd, events: Events,
                                                                    tmp_path: Path) -> None:
    c, cid = containerd, "kf-qemu9"
    try:
        _run_detached(c, cid, write_config(tmp_path / "c.toml"))
        pid = recorded_vmm_pid(c, cid)
        start = c.log_path.stat().st_size
        _, exits = _vm_ends(c, cid, events, "kill -9 of QEMU", lambda: os.kill(pid, signal.SIGKILL))
        assert len(exits) == 1 and '"exit_status":255' in exits[0], exits
        assert "vmm-killed" in shim_log_since(c, start)
    finally:
        remove(c, cid)
    assert not nothing_left(c, cid)


def test_guest_kernel_panic_exits_the_task(containerd: PrivateContainerd, events: Events, tmp_path: Path) -> None:
    """An NMI from outside (QMP inject-nmi) panics a kernel booted to panic on one (NMI_PANICS);
    ``panic=-1`` turns the panic into a reset and QEMU's ``-no-reboot`` into its exit, which the shim sees."""
    c, cid = containerd, "kf-panic"
    try:
        _run_detached(c, cid, write_config(tmp_path / "c.toml", kernel_params=NMI_PANICS, test_qmp=True))
        start = c.log_path.stat().st_size
        _, exits = _vm_ends(c, cid, events, "guest kernel panic", lambda: qmp(c, cid, "inject-nmi"))
        assert len(exits) == 1 and '"exit_status":255' in exits[0], exits
        logged = shim_log_since(c, start)
        # QEMU's exit (reason guest-panic) or, when the guest's reset closes the agent's vsock connection
        # first, the agent's WaitProcess failing: either marks the task exited 255
        assert "guest-panic" in logged or "wait_process failed" in logged, logged[-3000:]
    finally:
        remove(c, cid)
    assert not nothing_left(c, cid)


def _run_stuck(c: PrivateContainerd, cid: str, config: Path, stop_when: str) -> tuple[int, str, float]:
    """``ctr run`` whose QEMU is SIGSTOPped once the console shows ``stop_when``; returns (exit status, ctr's
    stderr, seconds from the stop to ctr's exit)."""
    cmd = ["ctr", "--address", c.address, "--namespace", c.namespace, "run", "--rm", "--runtime", RUNTIME,
           "--runtime-config-path", str(config), IMAGE, cid, "true"]
    proc = subprocess.Popen(cmd, env=c.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pid = 0
    try:
        pid = vmm_pid(c, cid)
        wait_console(c, cid, stop_when, until=proc.poll)
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=2 * STUCK_TIMEOUT_S + TEARDOWN_S + 30)
        return proc.returncode, err, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid:
            resume_and_kill(pid)


def test_guest_stuck_in_boot_fails_the_run_within_the_dial_timeout(containerd: PrivateContainerd,
                                                                  tmp_path: Path) -> None:
    """QEMU stopped once the guest's init runs, seconds before its agent listens: the dial times out."""
    c, cid = containerd, "kf-stuck-boot"
    config = write_config(tmp_path / "c.toml", dial_timeout=STUCK_TIMEOUT_S, request_timeout=STUCK_TIMEOUT_S)
    try:
        rc, err, took = _run_stuck(c, cid, config, "katapy-init:")
        print(f"stuck in boot: ctr run failed {took:.1f} s after SIGSTOP")
        assert rc != 0
        assert f"not ready after {STUCK_TIMEOUT_S}s" in err and "the VM still runs" in err, err
        assert took < STUCK_TIMEOUT_S + TEARDOWN_S, took
    finally:
        remove(c, cid)
    assert not nothing_left(c, cid)
