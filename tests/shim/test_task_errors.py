"""Task service error paths against a private containerd: each fails with a clear error in
``ctr``'s output (or the ttrpc status) and in the shim log, and leaves nothing behind."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from katapy.pb import containerd_shim_pb2 as pb
from katapy.pb import runtimeoptions_pb2

from .containerd import PrivateContainerd, shims_left
from .test_invocation import NS, TtrpcStatus, _stop_daemon, make_bundle, run_shim, ttrpc_call

pytestmark = pytest.mark.containerd
RUNTIME = "io.containerd.katapy.v2"


def _assert_clean(c: PrivateContainerd, cid: str) -> None:
    assert not (c.katapy_state / cid).exists(), f"state left: {list((c.katapy_state / cid).rglob('*'))}"
    assert cid not in c.ctr("containers", "ls", "-q").stdout.split()
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if f"/{cid}/" in line.split()[4] + "/" and "katapy" in line]


def test_missing_rootfs_fails_clearly_through_ctr(containerd: PrivateContainerd) -> None:
    res = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--rootfs", "/nonexistent-rootfs", "err-rootfs",
                         "true", check=False)
    assert res.returncode != 0
    assert "rootfs /nonexistent-rootfs does not exist" in res.stderr
    assert "rootfs /nonexistent-rootfs does not exist" in containerd.log_path.read_text()
    _assert_clean(containerd, "err-rootfs")
    assert not shims_left(containerd.katapy_state)


def test_missing_runtime_config_file_fails_clearly_through_ctr(containerd: PrivateContainerd, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-katapy.toml"
    res = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", str(missing),
                         "docker.io/katapy/busybox:latest", "err-config", "true", check=False)
    assert res.returncode != 0
    assert f"{missing}: configuration file not found" in res.stderr
    _assert_clean(containerd, "err-config")


@pytest.fixture
def shim(tmp_path: Path, containerd: PrivateContainerd):
    """A shim daemon started through the real ``start`` action, events going to the private containerd."""
    started = []

    def start(cid: str, annotations: dict[str, str] | None = None) -> tuple[Path, str]:
        bundle = make_bundle(tmp_path, cid, annotations)
        res = run_shim(bundle, "-id", cid, "start", env={"TTRPC_ADDRESS": containerd.ttrpc_address,
                                                        "KATAPY_STATE": str(containerd.katapy_state)})
        assert res.returncode == 0, res.stderr
        address = res.stdout.decode()
        started.append((bundle, address))
        return bundle, address[len("unix://"):]

    yield start
    for bundle, address in started:
        _stop_daemon(bundle, address)


def _create(sock: str, bundle: Path, cid: str, **kw) -> pb.CreateTaskResponse:
    req = pb.CreateTaskRequest(id=cid, bundle=str(bundle), **kw)
    return ttrpc_call(sock, "Create", req, pb.CreateTaskResponse)


def test_invalid_config_json_is_invalid_argument(shim) -> None:
    bundle, sock = shim("err-json")
    (bundle / "config.json").write_text('{"process": ')
    with pytest.raises(TtrpcStatus) as err:
        _create(sock, bundle, "err-json")
    assert err.value.code == 3 and "invalid config.json" in err.value.message


def test_spec_without_args_is_invalid_argument(shim) -> None:
    bundle, sock = shim("err-args")
    (bundle / "config.json").write_text(json.dumps({"process": {"args": []}, "root": {"path": "rootfs"}}))
    with pytest.raises(TtrpcStatus) as err:
        _create(sock, bundle, "err-args")
    assert err.value.code == 3 and "args must be a non-empty list" in err.value.message


def test_unknown_runtime_option_is_invalid_argument(shim) -> None:
    bundle, sock = shim("err-opts")
    opts = any_pb2.Any(type_url="io.containerd.runc.v1.Options", value=b"\x08\x01")
    with pytest.raises(TtrpcStatus) as err:
        _create(sock, bundle, "err-opts", options=opts)
    assert err.value.code == 3
    assert "unknown runtime options type 'io.containerd.runc.v1.Options'" in err.value.message


def test_runtime_options_with_bad_config_path_is_invalid_argument(shim, tmp_path: Path) -> None:
    bundle, sock = shim("err-optpath")
    bad = tmp_path / "bad.toml"
    bad.write_text("[hypervisor]\nnoSuchKey = 1\n")
    msg = runtimeoptions_pb2.Options(config_path=str(bad))
    opts = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=msg.SerializeToString())
    with pytest.raises(TtrpcStatus) as err:
        _create(sock, bundle, "err-optpath", options=opts)
    assert err.value.code == 3 and "unknown key [hypervisor] noSuchKey" in err.value.message


def test_tty_without_console_is_invalid_argument(shim, tmp_path: Path) -> None:
    bundle, sock = shim("err-tty")
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = True
    (bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(TtrpcStatus) as err:
        _create(sock, bundle, "err-tty", terminal=True, stdout="")
    assert err.value.code == 3 and "terminal requested but no console" in err.value.message


def test_terminal_mismatch_is_invalid_argument(shim, tmp_path: Path) -> None:
    bundle, sock = shim("err-ttymis")
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    with pytest.raises(TtrpcStatus) as err:
        _create(sock, bundle, "err-ttymis", terminal=True, stdout=str(fifo))
    assert err.value.code == 3 and "process.terminal=False but the task asks terminal=True" in err.value.message


def test_requests_for_unknown_tasks_are_not_found(shim) -> None:
    bundle, sock = shim("err-nf")
    for method, req, resp in [("State", pb.StateRequest(id="nope"), pb.StateResponse),
                              ("Delete", pb.DeleteRequest(id="nope"), pb.DeleteResponse),
                              ("Kill", pb.KillRequest(id="nope", signal=9), pb.DeleteResponse),
                              ("Wait", pb.WaitRequest(id="nope"), pb.WaitResponse)]:
        with pytest.raises(TtrpcStatus) as err:
            ttrpc_call(sock, method, req, resp)
        assert err.value.code == 5, (method, err.value.message)


def test_checkpoint_is_unimplemented_with_a_clear_message(shim) -> None:
    bundle, sock = shim("err-ckpt")
    with pytest.raises(TtrpcStatus) as err:
        ttrpc_call(sock, "Checkpoint", pb.CheckpointTaskRequest(id="err-ckpt"), pb.StateResponse)
    assert err.value.code == 12 and "checkpoint is not supported by katapy" in err.value.message


def test_shutdown_with_no_containers_exits_the_daemon_and_removes_its_socket(shim) -> None:
    import time

    bundle, sock = shim("err-shut")
    pid = int((bundle / "shim.pid").read_text())
    ttrpc_call(sock, "Shutdown", pb.ShutdownRequest(id="err-shut"), pb.StateResponse)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(sock):
        time.sleep(0.05)
    assert not os.path.exists(sock)
    stat = Path(f"/proc/{pid}/stat")

    def alive() -> bool:
        try:
            return stat.read_text().split()[2] != "Z"
        except OSError:
            return False

    while time.monotonic() < deadline and alive():
        time.sleep(0.05)
    assert not alive(), "shim daemon still running after Shutdown"
