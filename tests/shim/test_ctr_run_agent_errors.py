"""``ctr run`` whose VM boots but whose agent never answers the shim: the run fails with a message that says
how far the guest got, the shim log carries the end of the VM's console, and nothing is left behind.

The guest is real (katapy's kernel and image, through the configured hypervisor); what goes wrong is set with
a runtime configuration file (``ctr run --runtime-config-path``, the runtime options' ConfigPath) whose kernel
parameters the guest really acts on.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from .containerd import PrivateContainerd, shims_left
from .test_ctr_run import IMAGE, RUNTIME, _containerd_log_on_failure, _guest_needed  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.containerd, pytest.mark.guest, pytest.mark.slow]
DIAL_TIMEOUT_S = 45  # a TCG boot reaches the agent in ~10 s here


def _run(c: PrivateContainerd, cid: str, config: Path) -> tuple[int, str, str]:
    """``ctr run`` with ``config``; returns (exit status, ctr's stderr, what containerd and the shim logged)."""
    start = c.log_path.stat().st_size
    res = c.ctr("run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", str(config), IMAGE, cid, "true",
                check=False, timeout=DIAL_TIMEOUT_S + 240)
    with open(c.log_path, errors="replace") as f:
        f.seek(start)
        logged = f.read()
    return res.returncode, res.stderr, logged


def _assert_nothing_left(c: PrivateContainerd, cid: str) -> None:
    assert not (c.katapy_state / cid).exists(), f"state left: {list((c.katapy_state / cid).rglob('*'))}"
    assert cid not in c.ctr("containers", "ls", "-q").stdout.split()
    assert not shims_left(c.katapy_state)


def test_agent_on_another_port_fails_the_run_with_the_consoles_end(containerd: PrivateContainerd,
                                                                  tmp_path: Path) -> None:
    """The agent reads its port from the kernel command line (the last katapy.agent_port= wins), so the
    guest boots and serves on 1999 while the shim dials the configured 1024: a VM that runs and an agent
    that never answers, as a guest stuck late in its boot would look."""
    config = tmp_path / "other-port.toml"
    config.write_text(f'[hypervisor]\nkernel_params = "katapy.agent_port=1999"\n'
                      f"[agent]\nport = 1024\ndial_timeout = {DIAL_TIMEOUT_S}.0\n")
    rc, stderr, logged = _run(containerd, "agent-other-port", config)
    assert rc != 0
    assert f"not ready after {DIAL_TIMEOUT_S}.0s" in stderr, stderr
    assert "the VM still runs, its console ends:" in stderr, stderr
    # the console's end, in ctr's message and in the shim log: the agent came up, on the other port
    assert "katapy-agent: ready port=1999" in stderr, stderr
    shim_lines = [ln for ln in logged.splitlines() if "agent did not answer while the VM runs" in ln]
    assert shim_lines and "katapy-agent: ready port=1999" in shim_lines[0], logged[-3000:]
    _assert_nothing_left(containerd, "agent-other-port")


def test_guest_that_panics_fails_the_run_at_once_with_the_panic(containerd: PrivateContainerd,
                                                                tmp_path: Path) -> None:
    """No init at the path the kernel is told to run: the guest kernel panics ("No working init found")
    and resets; the shim stops dialling at once rather than for the whole dial timeout."""
    config = tmp_path / "no-init.toml"
    config.write_text('[hypervisor]\nkernel_params = "rdinit=/no-such-init init=/no-such-init"\n'
                      "[agent]\ndial_timeout = 600.0\n")
    rc, stderr, logged = _run(containerd, "guest-panics", config)
    assert rc != 0
    assert "the VM ended before its agent answered" in stderr, stderr
    assert "Kernel panic" in stderr, stderr
    assert "VM ended before the agent answered" in logged, logged[-3000:]
    _assert_nothing_left(containerd, "guest-panics")
