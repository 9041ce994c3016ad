"""The shim's metrics endpoint and ``katapy monitor`` with a real sandbox: containerd, ``ctr run``, the
configured backend (QEMU microvm under TCG on this host), Debian's promtool on what is served.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from katapy.metrics.endpoint import SOCKET_NAME, fetch
from katapy.metrics.monitor import Monitor

from .containerd import PrivateContainerd
from .test_ctr_run import BOOT_TIMEOUT, IMAGE, RUNTIME, _leftovers, _require_guest

pytestmark = [pytest.mark.containerd, pytest.mark.guest, pytest.mark.slow]
CID = "kr-metrics"


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in:\n{text}")


def _value_label(text: str, family: str, label: str) -> str:
    for line in text.splitlines():
        if line.startswith(family + "{"):
            return line.split(f'{label}="', 1)[1].split('"', 1)[0]
    raise AssertionError(f"{family} not in:\n{text}")


def test_a_running_sandbox_is_scraped_and_leaves_with_its_socket(containerd: PrivateContainerd) -> None:
    _require_guest()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make setup installs it)")
    c = containerd
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, CID, "sleep", "600", timeout=BOOT_TIMEOUT)
    mon = Monitor(c.katapy_state, scrape_timeout=2.0)
    try:
        sock = c.katapy_state / CID / SOCKET_NAME
        deadline = time.monotonic() + 30
        while not sock.is_socket() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sock.is_socket(), f"{sock} never appeared: {list(c.katapy_state.glob('*/*'))}"
        own = fetch(sock, 5).decode()
        assert _value(own, "katapy_sandbox_up") == 1
        text = mon.render()
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert r.returncode == 0, (r.stdout + r.stderr).decode()
        text_s = text.decode()
        lab = f'{{sandbox_id="{CID}"}}'
        assert _value(text_s, f"katapy_sandbox_up{lab}") == 1
        assert _value(text_s, f"katapy_sandbox_containers{lab}") == 1
        assert _value(text_s, f"katapy_hypervisor_vcpus{lab}") >= 1
        assert _value(text_s, f"katapy_hypervisor_memory_bytes{lab}") >= 64 << 20
        assert _value(text_s, f"katapy_hypervisor_resident_memory_bytes{lab}") > 10 << 20  # the VMM's guest RAM
        assert _value(text_s, f"katapy_shim_threads{lab}") >= 1
        assert _value(text_s, f'katapy_shim_task_requests_total{{method="Create",outcome="ok",sandbox_id="{CID}"}}') == 1
        assert _value(text_s, f'katapy_hypervisor_boot_seconds{{phase="vm_start",sandbox_id="{CID}"}}') > 0
        assert _value(text_s, f"katapy_monitor_scrape_up{lab}") == 1
        # katapy sandbox list / inspect read the same record and endpoint
        katapy = [sys.executable, "-m", "katapy.cli", "sandbox"]
        listed = subprocess.run([*katapy, "list", "--state-dir", str(c.katapy_state)], capture_output=True,
                                text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        row = next(ln.split() for ln in listed.stdout.splitlines() if ln.startswith(CID))
        assert row[2] == "running" and row[3] == str(int(_value(text_s, f"katapy_hypervisor_vcpus{lab}"))), row
        inspected = subprocess.run([*katapy, "inspect", CID, "--state-dir", str(c.katapy_state)],
                                   capture_output=True, text=True, timeout=60)
        assert inspected.returncode == 0, inspected.stderr
        info = json.loads(inspected.stdout)
        assert info["id"] == CID and info["state"] == "running" and info["shim_alive"] and info["uptime_s"] > 0
        assert info["hypervisor"] == _value_label(text_s, "katapy_sandbox_info", "hypervisor")
        assert CID in info["containers"]

        # the guest's own figures, through the agent's GetMetrics
        assert _value(text_s, f"katapy_guest_up{lab}") == 1
        assert _value(text_s, f'katapy_guest_meminfo_bytes{{item="MemTotal",sandbox_id="{CID}"}}') > 32 << 20
        assert _value(text_s, f"katapy_agent_threads{lab}") >= 1
        assert f'katapy_guest_cpu_seconds_total{{cpu="0",mode="idle",sandbox_id="{CID}"}}' in text_s

        # a guest that does not answer (its VMM stopped): the scrape is bounded and reports the guest down
        record = json.loads((c.katapy_state / CID / "sandbox.json").read_text())
        if record["vmm_pid"] and record["vmm_pid"] != record["shim_pid"]:
            os.kill(record["vmm_pid"], signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                frozen = mon.render().decode()
                assert time.monotonic() - t0 < 2.0 + 1.0
            finally:
                os.kill(record["vmm_pid"], signal.SIGCONT)
            assert _value(frozen, f"katapy_monitor_scrape_up{lab}") == 1
            assert _value(frozen, f"katapy_guest_up{lab}") == 0
            assert "katapy_guest_meminfo_bytes" not in frozen
            deadline = time.monotonic() + 30  # the agent connection survived the late answer
            while _value(mon.render().decode(), f"katapy_guest_up{lab}") != 1:
                assert time.monotonic() < deadline, "the guest never answered again after SIGCONT"
                time.sleep(0.5)

        # scrapes while the sandbox is torn down: every one ends in bounded time, none fails
        took: list[float] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def scraper() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    mon.render()
                except BaseException as exc:  # noqa: BLE001 - recorded, asserted below
                    errors.append(exc)
                took.append(time.monotonic() - t0)

        t = threading.Thread(target=scraper)
        t.start()
        try:
            c.ctr("task", "kill", "-s", "SIGKILL", CID)
            c.ctr("task", "delete", CID, check=False, timeout=60)
            c.ctr("containers", "rm", CID, check=False)
        finally:
            stop.set()
            t.join(timeout=30)
        assert not errors, errors
        assert took and max(took) < 2.0 + 1.5, max(took)
        # containerd does not wait for the shim to exit after Shutdown: the socket goes with the shim
        deadline = time.monotonic() + 20
        while sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not sock.exists(), "the metrics socket outlived its shim by 20 s"
        assert f'sandbox_id="{CID}"' not in mon.render().decode()
    finally:
        mon.close()
        c.ctr("task", "delete", "-f", CID, check=False)
        c.ctr("containers", "rm", CID, check=False)
    assert not _leftovers(c)
