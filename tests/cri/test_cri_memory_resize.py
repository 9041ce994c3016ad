"""Live memory resize of a katapy pod through containerd's CRI plugin.

Kata's rule (katapy.resource.memory): the VM gets default_memory plus the sum
of its containers' memory limits, in 128 MiB hotplug blocks above the boot
size, capped at ``[hypervisor] max_memory``.  On the built-in VMM the shim
hot-adds KVM memory slots and the guest's agent onlines the blocks it is told
about over the upcall channel; the container sees it in /proc/meminfo.  On
QEMU's microvm (no memory hotplug) the pod keeps its boot size: a container
created with a limit runs (a warning in the shim log) and an explicit
UpdateContainerResources that needs more memory is refused with the reason.

Debian's containerd 1.6 ``ctr`` has no ``task update``: the resize is driven
through CRI UpdateContainerResources, which containerd turns into the shim's
UpdateTask.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from katapy.pb import cri_api_pb2 as cri

from .test_cri_pods import _assert_nothing_left, _log_mark, _need, _netns_of

pytestmark = [pytest.mark.containerd, pytest.mark.slow, pytest.mark.guest]
RUNNING = cri.CONTAINER_RUNNING
MIB = 1 << 20
BOOT_MIB = 512  # tests/cri/conftest.py: default_memory = 512, max_memory = 2048

MEMHOG_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
/* memhog MIB: map MIB MiB of anonymous memory populated for writing (every page backed), then exit 0 */
int main(int argc, char **argv) {
    size_t len = (size_t)atol(argv[1]) << 20;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 1; }
    ((volatile char *)p)[len - 1] = 1;
    printf("held %s MiB\n", argv[1]);
    return 0;
}
"""


@pytest.fixture(scope="module")
def memhog(tmp_path_factory) -> Path:
    """A static binary (no libc in the busybox image) that makes the guest back N MiB."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (build-essential): the memory test's allocator cannot be built")
    d = tmp_path_factory.mktemp("memhog")
    (d / "memhog.c").write_text(MEMHOG_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "memhog"), str(d / "memhog.c")], check=True)
    return d


def _mem_total_mib(cl, cid: str) -> int:
    r = cl.exec_sync(cid, ["cat", "/proc/meminfo"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    m = re.search(rb"MemTotal:\s+(\d+) kB", r.stdout)
    assert m, r.stdout
    return int(m.group(1)) // 1024


def _limit(mib: int) -> cri.LinuxContainerResources:
    return cri.LinuxContainerResources(memory_limit_in_bytes=mib * MIB)


def _shim_rss_kib(c, pod_id: str) -> int:
    """VmRSS of the pod's shim (for the built-in VMM it holds the guest's RAM)."""
    pids = c.shim_pids()
    assert pids, "no shim running"
    best = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    best = max(best, int(line.split()[1]))
    return best


@pytest.fixture
def pod_on(request, tmp_path):
    """A katapy pod on ``request.param``'s backend; afterwards nothing of it may be left."""
    backend = request.param
    _need("katapy", backend)
    c = request.getfixturevalue("cri_containerd_builtin" if backend == "builtin" else "cri_containerd")
    config = c.client.pod_config("memresize", dns=["10.96.0.10"], log_dir=str(tmp_path))
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


def _hog_mount(memhog: Path) -> list[cri.Mount]:
    return [cri.Mount(container_path="/hog", host_path=str(memhog), readonly=True)]


@pytest.mark.kvm
@pytest.mark.parametrize("pod_on", ["builtin"], indirect=True)
def test_builtin_pod_memory_follows_container_limits(pod_on, memhog):
    c, pod_id, config = pod_on
    cl = c.client
    app = cl.create_container(pod_id, config, "app", ["sleep", "3600"], mounts=_hog_mount(memhog))
    cl.start_container(app)
    assert cl.wait_state(app, RUNNING).state == RUNNING
    boot_total = _mem_total_mib(cl, app)
    assert boot_total <= BOOT_MIB
    # 640 MiB cannot be backed by a 512 MiB VM: the guest's OOM killer ends the allocator
    r = cl.exec_sync(app, ["/hog/memhog", "640"], timeout=120)
    assert r.exit_code != 0, r.stdout
    rss_small = _shim_rss_kib(c, pod_id)

    # UpdateContainerResources: limit 1 GiB -> 512 + 1024 = 1536 MiB (12 blocks hot-added)
    cl.update_resources(app, _limit(1024))
    grown = _mem_total_mib(cl, app)
    assert grown - boot_total == 1024, (boot_total, grown)
    r = cl.exec_sync(app, ["/hog/memhog", "640"], timeout=300)
    assert r.exit_code == 0 and b"held 640 MiB" in r.stdout, (r.exit_code, r.stdout, r.stderr)
    rss_big = _shim_rss_kib(c, pod_id)
    assert rss_big > rss_small + 100 * 1024, (rss_small, rss_big)  # the guest's pages are the shim's memory

    # limit 128 MiB -> 512 + 128 = 640 MiB: the guest offlines 7 blocks, the VMM removes their slots and
    # gives the pages back (the shim's RSS drops by most of what the allocator had touched)
    mark = _log_mark(c)
    cl.update_resources(app, _limit(128))
    assert _mem_total_mib(cl, app) - boot_total == 128
    rss_after = _shim_rss_kib(c, pod_id)
    assert rss_after < rss_big - 100 * 1024, (rss_big, rss_after)
    with open(c.log_path, errors="replace") as f:
        f.seek(mark)
        log = f.read()
    assert "memory removed" in log, log[-3000:]

    # past max_memory: capped at 2048, logged, the update succeeds
    mark = _log_mark(c)
    cl.update_resources(app, _limit(4096))
    assert _mem_total_mib(cl, app) - boot_total == 2048 - BOOT_MIB
    with open(c.log_path, errors="replace") as f:
        f.seek(mark)
        assert "memory target capped at max_memory" in f.read()

    # removing the container gives all of it back
    cl.stop_container(app, timeout=2)
    cl.remove_container(app)
    idle = cl.create_container(pod_id, config, "idle", ["sleep", "3600"])
    cl.start_container(idle)
    assert cl.wait_state(idle, RUNNING).state == RUNNING
    assert _mem_total_mib(cl, idle) == boot_total


@pytest.mark.parametrize("pod_on", ["qemu"], indirect=True)
def test_qemu_pod_keeps_its_memory_and_refuses_an_update_that_needs_more(pod_on):
    c, pod_id, config = pod_on
    cl = c.client
    mark = _log_mark(c)
    # created with a limit: the pod keeps its boot size (microvm has no memory hotplug), with a warning
    app = cl.create_container(pod_id, config, "app", ["sleep", "3600"],
                              linux=cri.LinuxContainerConfig(resources=_limit(256)))
    cl.start_container(app)
    assert cl.wait_state(app, RUNNING).state == RUNNING
    boot_total = _mem_total_mib(cl, app)
    assert boot_total <= BOOT_MIB
    with open(c.log_path, errors="replace") as f:
        f.seek(mark)
        assert "sandbox memory stays as booted" in f.read()
    # an explicit update that needs more memory: refused with the reason, the container's limit unchanged
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        cl.update_resources(app, _limit(1024))
    assert "no memory hotplug" in err.value.details(), err.value.details()
    r = cl.exec_sync(app, ["sh", "-c", 'cat "/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max"'])
    assert r.stdout.strip() == str(256 * MIB).encode(), r.stdout
    assert _mem_total_mib(cl, app) == boot_total


@pytest.mark.parametrize("pod_on", ["qemu"], indirect=True)
def test_an_oom_kill_in_the_guest_reaches_cri_as_oomkilled(pod_on, memhog):
    """A container past its memory limit is killed by the guest kernel's OOM killer (its cgroup's
    memory.max); the agent's GetOOMEvent gives it to the shim, which publishes TaskOOM, and containerd's
    CRI reports the container as exited with reason OOMKilled (Kata's GetOOMEvent path)."""
    c, pod_id, config = pod_on
    cl = c.client
    mark = _log_mark(c)
    hog = cl.create_container(pod_id, config, "hog", ["/hog/memhog", "200"], mounts=_hog_mount(memhog),
                              linux=cri.LinuxContainerConfig(resources=_limit(64)))
    cl.start_container(hog)
    st = cl.wait_state(hog, cri.CONTAINER_EXITED, timeout=120)
    with open(c.log_path, errors="replace") as f:
        f.seek(mark)
        log = f.read()
    assert (st.state, st.exit_code, st.reason) == (cri.CONTAINER_EXITED, 137, "OOMKilled"), (
        st.state, st.exit_code, st.reason, st.message, log[-3000:])
    # the pod and its other containers go on
    app = cl.create_container(pod_id, config, "after", ["sleep", "3600"])
    cl.start_container(app)
    assert cl.wait_state(app, RUNNING).state == RUNNING
    assert cl.exec_sync(app, ["true"]).exit_code == 0
