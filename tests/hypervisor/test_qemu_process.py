"""The QEMU process layer against a real qemu-system-x86_64 (TCG) running a tiny PVH guest.

These run on any host with QEMU; they check the command line QEMU accepts,
QMP control, exit detection with reasons, and that nothing is left behind.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import trio

from katapy.hypervisor.base import HypervisorError, VmConfig
from katapy.hypervisor.qemu.command import QemuLaunch, build_command
from katapy.hypervisor.qemu.process import QEMU_PID, QMP_SOCKET, QemuProcess, kill_stale

from .conftest import QEMU, open_fds


def _process(tiny: dict[str, Path], state: Path, variant: str = "halt", **launch: object) -> QemuProcess:
    state.mkdir(mode=0o700)
    cfg = VmConfig("tiny", state, tiny[variant], tiny["initrd"], memory_mib=64, max_memory_mib=64)
    argv = build_command(cfg, QemuLaunch(Path(QEMU), "tcg", state / QMP_SOCKET, **launch))  # type: ignore[arg-type]
    return QemuProcess(argv, state, cfg.console_path)


async def _wait_console(q: QemuProcess, text: str, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while text not in (q.console_path.read_text() if q.console_path.exists() else ""):
            await trio.sleep(0.02)


def test_lifecycle_qmp_and_quit(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    fds_before = open_fds()

    async def main() -> None:
        q = _process(tiny_guest, short_tmp / "s")
        await q.spawn(short_tmp / "s" / QMP_SOCKET)
        assert await q.status() == "prelaunch"  # -S: no guest instruction before cont
        assert q.console_path.read_text() == ""
        await q.execute("cont")
        await _wait_console(q, "katapy-tiny: ready")
        assert await q.status() == "running"
        await q.execute("stop")
        assert await q.status() == "paused"
        await q.execute("cont")
        pid = q.pid
        result = await q.stop()
        assert result.reason == "stopped" and result.expected, result
        assert "katapy-tiny: ready" in result.console_tail
        assert not Path(f"/proc/{pid}").exists()
        await q.kill()  # idempotent after exit
        with pytest.raises(HypervisorError, match="not running"):
            await q.status()

    trio.run(main)
    assert open_fds() == fds_before


def test_kill_9_is_detected_quickly(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    async def main() -> None:
        q = _process(tiny_guest, short_tmp / "s")
        await q.spawn(short_tmp / "s" / QMP_SOCKET)
        await q.execute("cont")
        assert q.pid is not None
        os.kill(q.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with trio.fail_after(2):
            result = await q.wait()
        assert time.monotonic() - t0 < 2
        assert result.reason == "vmm-killed" and "SIGKILL" in result.detail, result
        await q.kill()

    trio.run(main)


def test_guest_reset_is_an_exit_with_reason(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    async def main() -> None:
        q = _process(tiny_guest, short_tmp / "s", variant="reset")
        await q.spawn(short_tmp / "s" / QMP_SOCKET)
        await q.execute("cont")
        with trio.fail_after(10):
            result = await q.wait()
        assert result.reason == "guest-reset", result
        assert result.exit_code == 0
        await q.kill()

    trio.run(main)


def test_qemu_start_failure_reports_qemu_words(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    async def main() -> None:
        state = short_tmp / "s"
        q = _process(tiny_guest, state)
        q.argv = [a if a != str(tiny_guest["halt"]) else str(state / "missing-kernel") for a in q.argv]
        with pytest.raises(HypervisorError, match="QEMU failed to start.*missing-kernel"):
            await q.spawn(state / QMP_SOCKET)
        assert not q.alive()

    trio.run(main)


def test_kill_stale_only_kills_qemu_of_that_state_dir(tiny_guest: dict[str, Path], short_tmp: Path) -> None:
    async def main() -> None:
        q = _process(tiny_guest, short_tmp / "s")
        await q.spawn(short_tmp / "s" / QMP_SOCKET)
        other = short_tmp / "other"
        other.mkdir()
        (other / QEMU_PID).write_text(f"{q.pid}\n")  # a pid file that names a qemu of another sandbox
        assert kill_stale(other) is None
        assert q.alive()
        assert kill_stale(short_tmp / "s") == q.pid
        with trio.fail_after(2):
            result = await q.wait()
        assert result.reason == "vmm-killed"
        await q.kill()

    trio.run(main)
