"""Live vCPU hotplug of a katapy pod on the built-in VMM through containerd's CRI plugin (``kvm``: the harness).

The pod's VM boots with default_vcpus = 1 KVM vCPU of ``max_vcpus`` = 4 (tests/cri/conftest.py); a
container's CPU quota makes katapy.resource.cpu grow it: the VMM creates the vCPU and its thread and the
guest onlines it through upcall ADD_CPU (katapy.vmm.vcpu_hotplug); removing the container offlines it and
parks the thread.  ``nproc`` in a container is what the guest has online.
"""
from __future__ import annotations

import os
import sys

import pytest

from katapy.pb import cri_api_pb2 as cri

from .test_cri_pods import _assert_nothing_left, _log_mark, _need, _netns_of
from .test_cri_resize import PERIOD, RUNNING, _limits, _nproc, _shim_log_since

pytestmark = [pytest.mark.containerd, pytest.mark.slow, pytest.mark.guest, pytest.mark.kvm]


@pytest.fixture
def builtin_pod(request, tmp_path):
    _need("katapy", "builtin")
    c = request.getfixturevalue("cri_containerd_builtin")
    config = c.client.pod_config("cpuresize", dns=["10.96.0.10"], log_dir=str(tmp_path))
    pod_id = c.client.run_pod(config, "katapy")
    netns = _netns_of(c, pod_id)
    held = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield c, pod_id, config
        c.remove_all_pods()
        _assert_nothing_left(c, [netns], [pod_id], held_netns=held)
    finally:
        c.remove_all_pods()
        os.close(held)


def test_builtin_pod_vcpus_are_hot_added_and_removed(builtin_pod):
    c, pod_id, config = builtin_pod
    mark = _log_mark(c)
    try:
        _grow_and_shrink(c, pod_id, config)
    except Exception as exc:
        # printed at once: under the harness the pod's teardown after a failure can outlast the harness
        print(f"test_builtin_pod_vcpus_are_hot_added_and_removed: {exc!r}\n--- shim log ---\n"
              f"{_shim_log_since(c, mark)[-6000:]}", file=sys.__stderr__, flush=True)
        raise


def _grow_and_shrink(c, pod_id, config) -> None:
    cl = c.client
    idle = cl.create_container(pod_id, config, "idle", ["sleep", "3600"])
    cl.start_container(idle)
    assert cl.wait_state(idle, RUNNING).state == RUNNING
    assert _nproc(cl, idle) == 1

    # quota 1 CPU: 1 + 1 = 2 vCPUs, vCPU 1 created and onlined by ADD_CPU
    mark = _log_mark(c)
    busy = cl.create_container(pod_id, config, "busy", ["sleep", "3600"],
                               linux=cri.LinuxContainerConfig(resources=_limits(PERIOD)))
    cl.start_container(busy)
    assert cl.wait_state(busy, RUNNING).state == RUNNING
    assert _nproc(cl, idle) == 2 and _nproc(cl, busy) == 2
    assert "vCPUs added" in _shim_log_since(c, mark)

    # removing the container offlines the vCPU (DEL_CPU) and parks its thread
    mark = _log_mark(c)
    cl.stop_container(busy, timeout=2)
    cl.remove_container(busy)
    assert _nproc(cl, idle) == 1
    log = _shim_log_since(c, mark)
    assert "vCPUs removed" in log and "vCPU thread stopped (parked)" in log, log[-3000:]
    cl.stop_container(idle, timeout=2)
    cl.remove_container(idle)
