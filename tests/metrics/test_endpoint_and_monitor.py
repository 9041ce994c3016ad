"""The shim's metrics endpoint and ``katapy monitor`` on this host: real unix sockets, real HTTP, Debian's
``promtool check metrics`` on what they serve, and a real Prometheus server scraping the monitor.

The sandboxes here are endpoints serving real process figures (this test's own pid) without a VM; the
shim's own endpoint is exercised through containerd in tests/metrics/test_shim_metrics.py.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from katapy.metrics import procfs
from katapy.metrics.endpoint import SOCKET_NAME, MetricsEndpoint, fetch
from katapy.metrics.monitor import Monitor, serve
from katapy.metrics.sandbox import SandboxSample, scrape

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def _promtool_ok(text: bytes) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian package prometheus; make setup installs it)")
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def _sample(vcpus: int = 2) -> SandboxSample:
    return SandboxSample("builtin", "running", True, vcpus, 512 << 20, 1, os.getpid(), os.getpid(),
                         {"vm_start": 1.25, "agent_connect": 2.5})


@pytest.fixture
def state_dir():
    d = Path(tempfile.mkdtemp(prefix="km-", dir="/tmp"))  # short: unix socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _endpoint(state_dir: Path, sid: str, sample, record: dict | None = None) -> MetricsEndpoint:
    d = state_dir / sid
    d.mkdir()
    if record is not None:
        (d / "sandbox.json").write_text(json.dumps(record))
    ep = MetricsEndpoint(d / SOCKET_NAME, lambda: scrape(sample))
    ep.start()
    return ep


def test_procfs_reads_this_process():
    s = procfs.read(os.getpid())
    assert s is not None
    assert s.threads == threading.active_count() or s.threads >= 1
    assert s.resident_bytes > 1 << 20 and s.open_fds >= 3 and s.cpu_seconds > 0
    assert procfs.read(2 ** 22 + 1) is None  # above pid_max: gone, not an error


def test_endpoint_serves_valid_exposition_and_refuses_other_paths(state_dir):
    threads_before = set(threading.enumerate())
    ep = _endpoint(state_dir, "sb1", _sample)
    try:
        sock = state_dir / "sb1" / SOCKET_NAME
        assert sock.stat().st_mode & 0o777 == 0o600
        body = fetch(sock, 5)
        _promtool_ok(body)
        text = body.decode()
        assert "katapy_sandbox_up 1.0" in text
        assert "katapy_hypervisor_vcpus 2.0" in text
        assert 'katapy_hypervisor_boot_seconds{phase="agent_connect"} 2.5' in text
        assert "katapy_shim_cpu_seconds_total" in text
        # a client that connects and never sends a request holds one handler thread, not the endpoint
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(str(sock))
        try:
            t0 = time.monotonic()
            assert b"katapy_sandbox_up" in fetch(sock, 5)
            assert time.monotonic() - t0 < 2
        finally:
            idle.close()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b"GET /debug HTTP/1.0\r\n\r\n")
            assert s.recv(100).split()[1] == b"404"
    finally:
        ep.close()
    assert not (state_dir / "sb1" / SOCKET_NAME).exists()
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(threading.enumerate()) - threads_before


def test_a_sandbox_that_is_gone_reports_down(state_dir):
    ep = _endpoint(state_dir, "sb1", lambda: None)
    try:
        body = fetch(state_dir / "sb1" / SOCKET_NAME, 5)
    finally:
        ep.close()
    _promtool_ok(body)
    assert "katapy_sandbox_up 0.0" in body.decode()


def test_monitor_labels_merges_and_survives_bad_shims(state_dir):
    a = _endpoint(state_dir, "a", lambda: _sample(2), {"pod_name": "web", "pod_namespace": "prod"})
    b = _endpoint(state_dir, "b", lambda: _sample(4))
    # c: a socket nobody serves any more (a shim killed without cleanup)
    (state_dir / "c").mkdir()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(state_dir / "c" / SOCKET_NAME))
    dead.close()
    # d: a shim that accepts and never answers
    (state_dir / "d").mkdir()
    stuck = socket.socket(socket.AF_UNIX)
    stuck.bind(str(state_dir / "d" / SOCKET_NAME))
    stuck.listen(4)
    mon = Monitor(state_dir, scrape_timeout=1.0)
    try:
        t0 = time.monotonic()
        body = mon.render()
        took = time.monotonic() - t0
        assert took < 3.0, f"a stuck shim held the scrape {took:.1f} s"
        _promtool_ok(body)
        text = body.decode()
        assert 'katapy_hypervisor_vcpus{pod_name="web",pod_namespace="prod",sandbox_id="a"} 2.0' in text
        assert 'katapy_hypervisor_vcpus{sandbox_id="b"} 4.0' in text
        assert text.count("# TYPE katapy_hypervisor_vcpus gauge") == 1  # one family for all sandboxes
        for sid, up in (("a", 1), ("b", 1), ("c", 0), ("d", 0)):
            assert f'katapy_monitor_scrape_up{{sandbox_id="{sid}"}} {up}.0' in text
        assert "katapy_monitor_sandboxes 4.0" in text
        # b goes away between two scrapes: its series go with it
        b.close()
        text = mon.render().decode()
        assert 'sandbox_id="b"' not in text and "katapy_monitor_sandboxes 3.0" in text
    finally:
        mon.close()
        a.close()
        b.close()
        stuck.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_prometheus_scrapes_the_monitor(state_dir, tmp_path):
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package prometheus; make setup installs it)")
    ep = _endpoint(state_dir, "pod1", lambda: _sample(3), {"pod_name": "web", "pod_namespace": "prod"})
    mon = Monitor(state_dir, scrape_timeout=1.0)
    server = serve(mon, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prom_port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: katapy\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.server_port}']\n")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "wb"))
    try:
        query = (f"http://127.0.0.1:{prom_port}/api/v1/query?query="
                 "katapy_hypervisor_vcpus%7Bsandbox_id%3D%22pod1%22%7D")
        deadline = time.monotonic() + 60
        result: list = []
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(query, timeout=2) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                result = []
            if result:
                break
            time.sleep(0.5)
        assert result, (tmp_path / "prom.log").read_text()[-2000:]
        metric, value = result[0]["metric"], result[0]["value"]
        assert metric["pod_name"] == "web" and metric["pod_namespace"] == "prod" and metric["job"] == "katapy"
        assert float(value[1]) == 3.0
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        server.shutdown()
        server.server_close()
        mon.close()
        ep.close()
