"""`ctr run` through the built-in VMM — the product's main path (issue 7).

The same scenarios as test_ctr_run.py, marked ``kvm``: on a host with hardware
KVM they run directly; on kvm-pvm hosts they are delegated to the nested KVM
harness, where /dev/kvm is kvm_amd and ``hypervisor = "auto"`` picks the
built-in VMM. Each test also checks, from the shim's own log line, that the
sandbox really ran on the built-in backend.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.shim import test_ctr_run as base
from tests.shim.containerd import PrivateContainerd
from tests.shim.test_ctr_run import _containerd_log_on_failure, _guest_needed  # noqa: F401 (autouse fixtures)

pytestmark = [pytest.mark.kvm, pytest.mark.guest, pytest.mark.containerd]


def _assert_builtin(c: PrivateContainerd, start: int) -> None:
    with open(c.log_path, errors="replace") as f:
        f.seek(start)
        started = [ln for ln in f if "event='sandbox started'" in ln]
    assert started, "no sandbox started in the shim log"
    assert all("backend='builtin'" in ln for ln in started), started


def _mark(c: PrivateContainerd) -> int:
    return c.log_path.stat().st_size if c.log_path.exists() else 0


def test_builtin_run_prints_guest_kernel_output(containerd: PrivateContainerd) -> None:
    m = _mark(containerd)
    base.test_run_prints_guest_kernel_output(containerd)
    _assert_builtin(containerd, m)


def test_builtin_exit_codes_propagate(containerd: PrivateContainerd) -> None:
    m = _mark(containerd)
    for code in (0, 3):
        base.test_exit_codes_propagate(containerd, code)
    _assert_builtin(containerd, m)


def test_builtin_detached_exec_ps_pause_metrics_kill_delete(containerd: PrivateContainerd) -> None:
    m = _mark(containerd)
    base.test_detached_exec_ps_pause_metrics_kill_delete(containerd)
    _assert_builtin(containerd, m)


def test_builtin_bind_mount_read_and_written(containerd: PrivateContainerd, tmp_path: Path) -> None:
    m = _mark(containerd)
    base.test_bind_mount_read_and_written(containerd, tmp_path)
    _assert_builtin(containerd, m)
