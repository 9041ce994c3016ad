"""The shim's metrics endpoint and ``katapy monitor`` with a real sandbox: containerd, ``ctr run``, the
configured backend (QEMU microvm under TCG on this host), Debian's promtool on what is served.
"""
from __future__ import annotations

import shutil
import subprocess
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
        assert not sock.exists()
        assert f'sandbox_id="{CID}"' not in mon.render().decode()
    finally:
        mon.close()
        c.ctr("task", "delete", "-f", CID, check=False)
        c.ctr("containers", "rm", CID, check=False)
    assert not _leftovers(c)
