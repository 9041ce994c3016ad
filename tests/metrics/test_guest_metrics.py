"""The agent's GetMetrics text (katapy.agent.metrics, read here from this host's procfs) and the shim's
checks on it (katapy.metrics.guest): the guest is untrusted, so forged, oversized or garbled answers
are refused as a whole."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from katapy.agent.metrics import collect
from katapy.metrics import guest


def test_the_agents_text_is_valid_exposition_and_accepted():
    text = collect()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make setup installs it)")
    r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    names = {f.name for f in guest.parse(text)}
    assert {"katapy_agent_threads", "katapy_guest_meminfo_bytes", "katapy_guest_cpu_seconds",
            "katapy_guest_load1"} <= names
    mem = next(f for f in guest.parse(text) if f.name == "katapy_guest_meminfo_bytes")
    total = next(s.value for s in mem.samples if s.labels == {"item": "MemTotal"})
    with open("/proc/meminfo") as f:
        assert total == int(f.readline().split()[1]) * 1024


@pytest.mark.parametrize("text, why", [
    ("# TYPE katapy_shim_threads gauge\nkatapy_shim_threads 1\n", "not the guest's"),
    ("# TYPE katapy_guest_up gauge\nkatapy_guest_up 1\n", "not the guest's"),
    ("node_load1 3\n", "not the guest's"),
    ("katapy_guest_x{a=\"1\"} 1\nkatapy_guest_x{{{ 2\n", "do not parse"),
    ("katapy_guest_big 1\n" + "#" * guest.MAX_BYTES, "more than"),
    ("# TYPE katapy_guest_many gauge\n" + "".join(f'katapy_guest_many{{i="{i}"}} 1\n' for i in range(guest.MAX_SAMPLES + 1)),
     "more than"),
])
def test_hostile_answers_are_refused(text, why):
    with pytest.raises(guest.GuestMetricsError, match=why):
        guest.parse(text)
