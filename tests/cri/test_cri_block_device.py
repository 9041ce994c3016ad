"""A host block device a CRI container asks for (ContainerConfig.devices), hot-plugged into the pod's VM.

containerd's CRI plugin turns ``devices {host_path, container_path, permissions}``
into a ``linux.devices`` entry (the host node's major:minor at the container
path) and a ``linux.resources.devices`` allow rule with the permissions.  The
katapy shim (katapy.resource.devices) finds the host node from the numbers,
hot-attaches it as virtio-blk on a virtio-mmio slot and tells the agent where
(Kata's "mmioblk" Device); the agent (katapy.agent.devices) finds the guest's
disk there and gives the spec its numbers, so crun makes the node in the
container.  The device here is a loop device over a file with a known pattern.

On the built-in VMM (``kvm``: the nested harness on a kvm-pvm host) the
container reads the pattern and writes a block that the host file holds once
the container is gone, and the VMM keeps no fd on the device afterwards.  On
QEMU's microvm (no hotplug bus) the task's create (CRI StartContainer) fails, naming the device and
the backend, and leaves nothing behind.
"""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from katapy.pb import cri_api_pb2 as cri
from katapy.testing.cri import BUSYBOX_IMAGE

from .test_cri_memory_resize import pod_on  # noqa: F401 (the fixture)
from .test_cri_pods import _log_mark, _need

pytestmark = [pytest.mark.containerd, pytest.mark.slow, pytest.mark.guest]
RUNNING = cri.CONTAINER_RUNNING
PATTERN = b"katapy-block-device-pattern\n".ljust(512, b".")
WRITTEN = b"katapy-wrote-this-from-the-container\n"
IMAGE_BYTES = 4 << 20
CONTAINER_PATH = "/dev/xvdb"


def _create_with_device(cl, pod_id: str, pod_config, name: str, command: list[str], host_path: str,
                        permissions: str = "rwm") -> str:
    return cl.create_container(pod_id, pod_config, name, command,
                               devices=[cri.Device(container_path=CONTAINER_PATH, host_path=host_path,
                                                   permissions=permissions)])


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop device over a 4 MiB file whose first block is PATTERN; detached afterwards."""
    if subprocess.run(["sh", "-c", "command -v losetup"], capture_output=True).returncode != 0:
        pytest.skip("losetup (util-linux) is not installed")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.write(PATTERN)
        f.truncate(IMAGE_BYTES)
    r = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev, image
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        left = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.strip()
        assert not left, f"loop device still attached: {left}"


def _holders(pids: list[int], dev: str) -> list[str]:
    """``pid: fd`` of each open fd of ``pids`` on ``dev``."""
    real = os.path.realpath(dev)
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == real:
                    out.append(f"{pid}: fd {fd}")
            except OSError:
                pass
    return out


def _wait_no_holders(c, dev: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (held := _holders(c.shim_pids() + c.qemu_pids(), dev)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not held, f"{dev} still open after the container was removed: {held}"


def _need_backend(hypervisor: str) -> None:
    _need("katapy", hypervisor)


def _shim_log_since(c, mark: int) -> str:
    with open(c.log_path, errors="replace") as f:
        f.seek(mark)
        return f.read()


@pytest.mark.kvm
@pytest.mark.parametrize("pod_on", ["builtin"], indirect=True)
def test_builtin_container_reads_and_writes_a_hot_plugged_block_device(pod_on, loop_device):
    c, pod_id, config = pod_on
    cl = c.client
    dev, image = loop_device
    mark = _log_mark(c)
    app = _create_with_device(cl, pod_id, config, "blk", ["sleep", "3600"], dev)
    cl.start_container(app)
    assert cl.wait_state(app, RUNNING).state == RUNNING
    r = cl.exec_sync(app, ["ls", "-l", CONTAINER_PATH])
    assert r.exit_code == 0 and r.stdout.startswith(b"b"), (r.stdout, r.stderr)
    r = cl.exec_sync(app, ["dd", f"if={CONTAINER_PATH}", "bs=512", "count=1"])
    assert r.exit_code == 0 and r.stdout == PATTERN, (r.stdout[:80], r.stderr)
    r = cl.exec_sync(app, ["sh", "-c", f"printf '{WRITTEN.decode().strip()}\\n' | "
                                       f"dd of={CONTAINER_PATH} bs=512 seek=1 conv=notrunc,fsync && sync"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    log = _shim_log_since(c, mark)
    assert "event='block device attached'" in log and f"host='{dev}'" in log, log[-3000:]
    assert _holders(c.shim_pids(), dev), f"the VMM (in the shim) has no fd on {dev} while the container runs"

    cl.stop_container(app, timeout=2)
    cl.remove_container(app)
    _wait_no_holders(c, dev)
    assert "event='block device detached'" in _shim_log_since(c, mark)
    with open(image, "rb") as f:
        f.seek(512)
        assert f.read(len(WRITTEN)) == WRITTEN

    # the same device again, read-only this time ("r"): attached again (the freed slot), readable, not writable
    ro = _create_with_device(cl, pod_id, config, "blk-ro", ["sleep", "3600"], dev, permissions="r")
    cl.start_container(ro)
    assert cl.wait_state(ro, RUNNING).state == RUNNING
    r = cl.exec_sync(ro, ["dd", f"if={CONTAINER_PATH}", "bs=512", "skip=1", "count=1"])
    assert r.exit_code == 0 and r.stdout.startswith(WRITTEN), (r.stdout[:80], r.stderr)
    r = cl.exec_sync(ro, ["sh", "-c", f"echo x | dd of={CONTAINER_PATH} bs=512 seek=2 conv=notrunc,fsync"])
    assert r.exit_code != 0, (r.stdout, r.stderr)
    cl.stop_container(ro, timeout=2)
    cl.remove_container(ro)
    _wait_no_holders(c, dev)
    with open(image, "rb") as f:
        f.seek(1024)
        assert f.read(2) != b"x\n"


@pytest.mark.parametrize("pod_on", ["qemu"], indirect=True)
def test_qemu_pod_refuses_a_block_device_and_keeps_running(pod_on, loop_device):
    """CRI makes the task (the shim's CreateTask: katapy's CreateContainer) at StartContainer: that fails."""
    c, pod_id, config = pod_on
    cl = c.client
    dev, _ = loop_device
    mark = _log_mark(c)
    blk = _create_with_device(cl, pod_id, config, "blk", ["sleep", "3600"], dev)
    with pytest.raises(grpc.RpcError) as err:
        cl.start_container(blk)
    detail = err.value.details()
    assert f"container {blk}: block device {CONTAINER_PATH} (host {dev}" in detail, detail
    assert "the qemu (QEMU microvm) backend does not support block device hotplug" in detail, detail
    assert cl.container_status(blk).state != RUNNING
    assert not _holders(c.shim_pids() + c.qemu_pids(), dev)
    assert "block device attached" not in _shim_log_since(c, mark)
    cl.remove_container(blk)
    # the pod is as it was: a container without the device runs
    app = cl.create_container(pod_id, config, "plain", ["sleep", "3600"])
    cl.start_container(app)
    assert cl.wait_state(app, RUNNING).state == RUNNING


# -- ctr run --device: the same spec shape (linux.devices + an "rwm" allow rule), container path = host path --


def _ctr_run(c, cid: str, dev: str, *cmd: str, timeout: float = 600):
    """``ctr run --rm --device dev`` on katapy with the test's configuration (runtime options' config_path)."""
    return c.ctr("run", "--rm", "--runtime", "io.containerd.katapy.v2", "--runtime-config-path",
                 str(c.katapy_config), "--device", dev, BUSYBOX_IMAGE, cid, *cmd, check=False, timeout=timeout)


def _ctr_containers(c) -> list[str]:
    return c.ctr("containers", "ls", "-q").stdout.split()


@pytest.mark.kvm
def test_builtin_ctr_run_device_reads_the_pattern(cri_containerd_builtin, loop_device):
    c = cri_containerd_builtin
    _need_backend("builtin")
    dev, image = loop_device
    mark = _log_mark(c)
    r = _ctr_run(c, "blk-ctr", dev, "sh", "-c", f"dd if={dev} bs=512 count=1 2>/dev/null | head -c 28; "
                                                f"printf 'ctr-wrote\\n' | dd of={dev} bs=512 seek=3 conv=notrunc,fsync")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.startswith(PATTERN[:28].decode()), r.stdout
    assert "event='block device attached'" in _shim_log_since(c, mark)
    assert "blk-ctr" not in _ctr_containers(c)
    _wait_no_holders(c, dev)
    with open(image, "rb") as f:
        f.seek(3 * 512)
        assert f.read(10) == b"ctr-wrote\n"


def test_qemu_ctr_run_device_is_refused_and_leaves_nothing(cri_containerd, loop_device):
    c = cri_containerd
    _need_backend("qemu")
    dev, _ = loop_device
    r = _ctr_run(c, "blk-ctr-q", dev, "true")
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert f"block device {dev} (host {dev}" in r.stderr, r.stderr
    assert "the qemu (QEMU microvm) backend does not support block device hotplug" in r.stderr, r.stderr
    assert "blk-ctr-q" not in _ctr_containers(c)
    _wait_no_holders(c, dev)
    deadline = time.monotonic() + 20
    while (left := c.shim_pids() + c.qemu_pids() + c.katapy_leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
