"""`ctr run` through the built-in VMM — the product's main path (issue 7).

The same scenarios as test_ctr_run.py, marked ``kvm``: on a host with hardware
KVM they run directly; on kvm-pvm hosts they are delegated to the nested KVM
harness, where /dev/kvm is kvm_amd and ``hypervisor = "auto"`` picks the
built-in VMM. Each test also checks, from the shim's own log line, that the
sandbox really ran on the built-in backend.
"""
from __future__ import annotations

import time
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


def _sum(text: str, prefix: str, *must: str) -> float:
    """The sum of the samples of ``prefix`` whose labels contain every string of ``must``."""
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(prefix + "{") and all(m in ln for m in must))


def test_builtin_sandbox_metrics_count_vm_exits_and_virtio_traffic(containerd: PrivateContainerd) -> None:
    """The shim's metrics endpoint of a real built-in sandbox: KVM exits by reason and the virtio queues'
    requests and bytes, which a container's output (100 KiB through the agent's vsock) moves."""
    from katapy.metrics.endpoint import SOCKET_NAME, fetch

    c, cid, m = containerd, "kr-bmetrics", _mark(containerd)
    c.ctr("run", "-d", "--runtime", base.RUNTIME, base.IMAGE, cid, "sleep", "600", timeout=base.BOOT_TIMEOUT)
    try:
        _assert_builtin(c, m)
        sock = c.katapy_state / cid / SOCKET_NAME
        for _ in range(150):
            if sock.is_socket():
                break
            time.sleep(0.2)
        before = fetch(sock, 10).decode()
        assert _sum(before, "katapy_hypervisor_vm_exits_total") > 0, before
        assert _sum(before, "katapy_hypervisor_vm_exits_total", 'reason="mmio') > 0, before  # virtio-mmio kicks
        assert _sum(before, "katapy_hypervisor_virtio_requests_total", 'device="virtio-vsock-') > 0, before
        assert _sum(before, "katapy_hypervisor_virtio_requests_total", 'device="virtio-fs-') > 0, before  # the rootfs
        res = c.ctr("task", "exec", "--exec-id", "big", cid, "head", "-c", "102400", "/dev/zero", check=False)
        assert res.returncode == 0 and len(res.stdout) == 102400, (res.returncode, len(res.stdout), res.stderr)
        after = fetch(sock, 10).decode()
        moved = (_sum(after, "katapy_hypervisor_virtio_bytes_total", 'device="virtio-vsock-')
                 - _sum(before, "katapy_hypervisor_virtio_bytes_total", 'device="virtio-vsock-'))
        assert moved >= 102400, f"vsock bytes moved by {moved} for 100 KiB of output"
        assert _sum(after, "katapy_hypervisor_vm_exits_total") > _sum(before, "katapy_hypervisor_vm_exits_total")
    finally:
        c.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        c.ctr("task", "delete", "-f", cid, check=False)
        c.ctr("containers", "rm", cid, check=False)
    assert not base._leftovers(c)
