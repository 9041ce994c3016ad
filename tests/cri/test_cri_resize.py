"""Live vCPU resize of a katapy pod through containerd's CRI plugin (qemu backend: QEMU microvm under TCG here).

The pod's VM has ``[hypervisor] max_vcpus`` = 4 vCPUs present and boots with
default_vcpus = 1 online (guest ``maxcpus=1``).  Kata's rule sizes it live:
vCPUs = default_vcpus + ceil(sum of the containers' quota / period), capped at
max_vcpus.  ``nproc`` in a container of the pod is what the guest has online
(busybox nproc: sched_getaffinity, which the kernel masks with the online CPUs).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from katapy.pb import cri_api_pb2 as cri

from .test_cri_pods import _assert_nothing_left, _log_mark, _need, _netns_of

pytestmark = [pytest.mark.containerd, pytest.mark.slow, pytest.mark.guest]
RUNNING = cri.CONTAINER_RUNNING
PERIOD = 100_000


def _limits(quota: int) -> cri.LinuxContainerResources:
    return cri.LinuxContainerResources(cpu_quota=quota, cpu_period=PERIOD)


def _nproc(cl, cid: str) -> int:
    r = cl.exec_sync(cid, ["nproc"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return int(r.stdout.strip())


def _shim_log_since(c, mark: int) -> str:
    with open(c.log_path, errors="replace") as f:
        f.seek(mark)
        return f.read()


def _first_log_line(path: Path, timeout: float = 30.0) -> str:
    """The first line a container wrote, from its CRI log (``<time> stdout F <line>``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().splitlines()[0].split(" ", 3)[3]
        time.sleep(0.2)
    raise AssertionError(f"{path}: nothing logged within {timeout} s")


@pytest.fixture
def pod(cri_containerd, tmp_path):
    """A katapy pod (1 vCPU online of 4) logging to ``tmp_path``; afterwards nothing of it may be left."""
    _need("katapy")
    c = cri_containerd
    config = c.client.pod_config("resize", dns=["10.96.0.10"], log_dir=str(tmp_path))
    pod_id = c.client.run_pod(config, "katapy")
    netns = _netns_of(c, pod_id)
    held = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield pod_id, config
        c.remove_all_pods()
        _assert_nothing_left(c, [netns], [pod_id], held_netns=held)
    finally:
        c.remove_all_pods()
        os.close(held)


def test_pod_vcpus_follow_container_limits(cri_containerd, pod, tmp_path):
    c = cri_containerd
    cl = c.client
    pod_id, config = pod
    # a container without limits: the pod keeps its boot size (default_vcpus = 1)
    idle = cl.create_container(pod_id, config, "idle", ["sleep", "3600"])
    cl.start_container(idle)
    assert cl.wait_state(idle, RUNNING).state == RUNNING
    assert _nproc(cl, idle) == 1

    # quota 3 CPUs: 1 + ceil(3) = 4.  containerd's CreateContainer only records the container; its
    # StartContainer is the shim's Create (resized here, before crun creates the process) then Start:
    # the container's first instruction already runs on 4 vCPUs
    busy = cl.create_container(pod_id, config, "busy", ["sh", "-c", "nproc; exec sleep 3600"],
                               linux=cri.LinuxContainerConfig(resources=_limits(300_000)))
    assert _nproc(cl, idle) == 1
    cl.start_container(busy)
    assert cl.wait_state(busy, RUNNING).state == RUNNING
    assert _first_log_line(tmp_path / "busy.log") == "4"
    assert _nproc(cl, busy) == 4 and _nproc(cl, idle) == 4

    # UpdateContainerResources to 1 CPU: 1 + 1 = 2; the container's guest cgroup (v2) follows too
    cl.update_resources(busy, _limits(100_000))
    assert _nproc(cl, idle) == 2 and _nproc(cl, busy) == 2
    r = cl.exec_sync(busy, ["sh", "-c", 'cat "/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/cpu.max"'])
    assert r.stdout.split() == [b"100000", b"100000"], (r.stdout, r.stderr)

    # past max_vcpus: capped at 4, logged, the update itself succeeds
    mark = _log_mark(c)
    cl.update_resources(busy, _limits(800_000))
    assert _nproc(cl, idle) == 4
    log = _shim_log_since(c, mark)
    assert "vCPU target capped at max_vcpus" in log and "wanted=9" in log, log[-2000:]

    # removing the container gives its vCPUs back
    cl.stop_container(busy, timeout=2)
    cl.remove_container(busy)
    assert _nproc(cl, idle) == 1
    cl.stop_container(idle, timeout=2)
    cl.remove_container(idle)
