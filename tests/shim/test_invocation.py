"""The shim v2 invocation contract (docs/protocols.md §1): start, delete, address file, grouping."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from katapy.pb import containerd_shim_pb2 as pb

from .containerd import REPO, shim_pids

NS = "katapytest"
CONTAINERD_ADDRESS = "/run/katapy-test/containerd.sock"


def run_shim(bundle: Path, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "katapy.shim.main", "-namespace", NS, "-address", CONTAINERD_ADDRESS,
           "-publish-binary", "/usr/bin/containerd", *args]
    full_env = dict(os.environ, PYTHONPATH=str(REPO / "src"), **(env or {}))
    return subprocess.run(cmd, cwd=bundle, input=stdin, capture_output=True, timeout=timeout, env=full_env)


def make_bundle(base: Path, cid: str, annotations: dict[str, str] | None = None) -> Path:
    bundle = base / cid
    (bundle / "rootfs").mkdir(parents=True)
    spec = {"ociVersion": "1.0.2", "process": {"args": ["true"], "cwd": "/"}, "root": {"path": "rootfs"},
            "annotations": annotations or {}}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def expected_address(group: str) -> str:
    digest = hashlib.sha256(f"{CONTAINERD_ADDRESS}/{NS}/{group}".encode()).hexdigest()
    return f"unix:///run/containerd/s/{digest}"


def _stop_daemon(bundle: Path, address: str) -> None:
    pid_file = bundle / "shim.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
            if status == "Z":
                break
            time.sleep(0.05)
    Path(address[len("unix://"):]).unlink(missing_ok=True)


def test_start_prints_only_the_address_and_spawns_a_detached_daemon(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "inv-start-1")
    t0 = time.monotonic()
    res = run_shim(bundle, "-id", "inv-start-1", "start")
    elapsed = time.monotonic() - t0
    address = expected_address("inv-start-1")
    try:
        assert res.returncode == 0, res.stderr
        assert res.stdout.decode() == address  # nothing else: containerd uses CombinedOutput
        assert res.stderr == b""
        assert (bundle / "address").read_text() == address
        pid = int((bundle / "shim.pid").read_text())
        # detached: its own session, not our child's process group
        assert os.getsid(pid) == pid
        sock_path = address[len("unix://"):]
        assert oct(os.stat(sock_path).st_mode & 0o777) == oct(0o600)
        # the daemon answers ttrpc Connect on that socket (no Create yet: task_pid 0)
        reply = ttrpc_call(sock_path, "Connect", pb.ConnectRequest(id="inv-start-1"), pb.ConnectResponse)
        assert reply.shim_pid == pid and reply.task_pid == 0
        assert elapsed < 10, f"start took {elapsed:.2f}s"
    finally:
        _stop_daemon(bundle, address)


def test_start_groups_pod_members_onto_the_sandbox_shim(tmp_path: Path) -> None:
    sandbox = make_bundle(tmp_path, "pod-sb", {"io.kubernetes.cri.container-type": "sandbox",
                                                 "io.kubernetes.cri.sandbox-id": "pod-sb"})
    member = make_bundle(tmp_path, "pod-c1", {"io.kubernetes.cri.container-type": "container",
                                                "io.kubernetes.cri.sandbox-id": "pod-sb"})
    address = expected_address("pod-sb")
    try:
        first = run_shim(sandbox, "-id", "pod-sb", "start")
        assert first.returncode == 0, first.stderr
        second = run_shim(member, "-id", "pod-c1", "start")
        assert second.returncode == 0, second.stderr
        assert first.stdout.decode() == second.stdout.decode() == address
        assert (member / "address").read_text() == address
        assert not (member / "shim.pid").exists()  # no second daemon
        # starting the sandbox again reuses the live shim (runc manager behaviour)
        again = make_bundle(tmp_path / "again", "pod-sb")
        third = run_shim(again, "-id", "pod-sb", "start")
        assert third.returncode == 0 and third.stdout.decode() == expected_address("pod-sb")
        assert not (again / "shim.pid").exists()
    finally:
        _stop_daemon(sandbox, address)


def test_start_with_invalid_config_fails_clearly(tmp_path: Path) -> None:
    bundle = tmp_path / "bad"
    bundle.mkdir()
    (bundle / "config.json").write_text("{not json")
    res = run_shim(bundle, "-id", "bad", "start")
    assert res.returncode != 0
    assert b"invalid config.json" in res.stderr
    assert res.stdout == b""
    assert not (bundle / "address").exists()
    assert not Path(expected_address("bad")[len("unix://"):]).exists()


def test_delete_prints_a_delete_response_and_cleans_state(tmp_path: Path) -> None:
    state = tmp_path / "katapy-state"
    bundle = make_bundle(tmp_path, "inv-del")
    # a dead shim's leftovers: a sandbox record and share directory
    sdir = state / "inv-del"
    (sdir / "shared" / "inv-del" / "rootfs").mkdir(parents=True)
    (sdir / "sandbox.json").write_text(json.dumps({
        "sandbox_id": "inv-del", "sandbox_dir": str(sdir), "shared_dir": str(sdir / "shared"),
        "cgroup_dirs": [], "shim_pid": 0, "vmm_pid": 0, "containers": ["inv-del"]}))
    before = time.time()
    res = run_shim(bundle, "-id", "inv-del", "-bundle", str(bundle), "delete", env={"KATAPY_STATE": str(state)})
    assert res.returncode == 0, res.stderr
    reply = pb.DeleteResponse()
    reply.ParseFromString(res.stdout)  # raw protobuf, no framing
    assert reply.exit_status == 137
    assert reply.exited_at.seconds >= int(before)
    assert not sdir.exists()


def test_bad_flag_and_action_are_usage_errors(tmp_path: Path) -> None:
    res = run_shim(tmp_path, "-id", "x", "-nosuchflag", "start")
    assert res.returncode == 2 and b"flag provided but not defined: -nosuchflag" in res.stderr
    res = run_shim(tmp_path, "-id", "x", "frobnicate")
    assert res.returncode == 2 and b"unknown action" in res.stderr


# -- a minimal ttrpc client call, written against the wire format (docs/protocols.md §3) --


def ttrpc_call(path: str, method: str, req, resp_cls, service: str = "containerd.task.v2.Task", timeout: float = 10):
    import struct

    from katapy.pb import ttrpc_pb2

    envelope = ttrpc_pb2.Request(service=service, method=method, payload=req.SerializeToString())
    data = envelope.SerializeToString()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(struct.pack(">IIBB", len(data), 1, 1, 0) + data)
        header = _recv(s, 10)
        length, stream_id, mtype, _ = struct.unpack(">IIBB", header)
        assert stream_id == 1 and mtype == 2
        resp = ttrpc_pb2.Response()
        resp.ParseFromString(_recv(s, length))
    if resp.status.code != 0:
        raise TtrpcStatus(resp.status.code, resp.status.message)
    out = resp_cls()
    out.ParseFromString(resp.payload)
    return out


class TtrpcStatus(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("ttrpc peer closed")
        buf += chunk
    return buf


@pytest.fixture(autouse=True)
def _no_leaked_shims(tmp_path: Path):
    yield
    leaked = [p for p in shim_pids(Path("/nonexistent")) if p]
    assert not leaked
