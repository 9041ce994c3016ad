"""One QEMU process: spawn it, drive it over QMP, notice when it dies, kill it.

This layer knows nothing of vhost-user or the agent; ``backend.py`` builds the
sandbox on top of it.  QEMU's own stderr goes to ``<state_dir>/qemu.log`` and
its pid to ``<state_dir>/qemu.pid``, so a later ``cleanup_state_dir`` (after
the shim itself died) can still find and stop it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import trio

from katapy import log
from katapy.hypervisor.base import HypervisorError, VmExit, panic_line, read_tail
from katapy.hypervisor.qemu.qmp import QmpClient, QmpError
from katapy.linux.fds import exhaustion_note

_log = log.get("hypervisor.qemu")

QEMU_LOG = "qemu.log"
QEMU_PID = "qemu.pid"
QMP_SOCKET = "qmp.sock"
QUIT_GRACE_S = 5.0


class QemuProcess:
    """A running qemu-system-x86_64 started with ``-S`` and a QMP socket."""

    def __init__(self, argv: list[str], state_dir: Path, console_path: Path, pass_fds: tuple[int, ...] = ()):
        self.argv = argv
        self.pass_fds = pass_fds  # fds QEMU inherits (tap fds named by -netdev tap,fd=N)
        self.state_dir = state_dir
        self.console_path = console_path
        self.qmp: QmpClient | None = None
        self.proc: trio.Process | None = None
        self.started_at = 0.0
        self._exit: VmExit | None = None
        self._exit_lock = trio.Lock()
        self._stopping = False  # stop() asked QEMU to quit: its exit is "stopped"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        return self.state_dir / QEMU_LOG

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def spawn(self, qmp_socket: Path, timeout: float = 30.0) -> None:
        """Start QEMU (vCPUs stopped) and connect QMP; raise HypervisorError with QEMU's own words on failure."""
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as logf:
            try:
                self.proc = await trio.lowlevel.open_process(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,  # a signal to the shim's group must not reach QEMU
                    pass_fds=self.pass_fds,
                )
            except OSError as exc:
                raise HypervisorError(f"cannot run {self.argv[0]}: {exc}") from None
        (self.state_dir / QEMU_PID).write_text(f"{self.proc.pid}\n")
        _log.info("qemu started", pid=self.proc.pid, state_dir=str(self.state_dir))
        _log.debug("qemu command", argv=" ".join(self.argv))
        try:
            self.qmp = await QmpClient.connect(qmp_socket, timeout, self.alive)
        except QmpError as exc:
            await self.kill()
            raise HypervisorError(f"QEMU failed to start: {exc}; qemu.log: {read_tail(self.log_path).strip()!r}"
                                  f"{exhaustion_note()}") from None

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self.qmp is None or not self.alive():
            raise HypervisorError(f"QMP {command}: QEMU is not running")
        try:
            return await self.qmp.execute(command, arguments)
        except QmpError as exc:
            raise HypervisorError(str(exc)) from None

    async def status(self) -> str:
        """QMP query-status: "running", "paused", "prelaunch", "shutdown", ..."""
        return str((await self.execute("query-status"))["status"])

    async def wait(self) -> VmExit:
        """Wait for QEMU to exit and say why."""
        if self._exit is not None:
            return self._exit
        if self.proc is None:
            raise HypervisorError("QEMU was never started")
        code = await self.proc.wait()
        async with self._exit_lock:
            if self._exit is None:
                if self.qmp is not None:
                    await self.qmp.drain_events()
                self._exit = self._classify(code)
                _log.info("qemu exited", pid=self.proc.pid, reason=self._exit.reason, detail=self._exit.detail)
        return self._exit

    def _classify(self, code: int) -> VmExit:
        console = read_tail(self.console_path)
        qemu_log = read_tail(self.log_path, 1024).strip()
        if code < 0:
            name = signal.Signals(-code).name
            if self._stopping:
                return VmExit("stopped", f"qemu killed by {name} after quit", code, console)
            return VmExit("vmm-killed", f"qemu killed by {name}", code, console)
        if self._stopping:
            return VmExit("stopped", "qemu quit on request", code, console)
        if code != 0:
            return VmExit("vmm-error", f"qemu exited with status {code}: {qemu_log}", code, console)
        panic = panic_line(console)
        if panic:
            return VmExit("guest-panic", panic, code, console)
        reason = self._shutdown_reason()
        if reason in ("guest-reset", "guest-panic"):
            return VmExit(reason, f"QEMU SHUTDOWN event: {reason}", code, console)
        return VmExit("guest-shutdown", f"QEMU SHUTDOWN event: {reason or 'unknown'}", code, console)

    def _shutdown_reason(self) -> str:
        if self.qmp is None:
            return ""
        for ev in reversed(self.qmp.events):
            if ev.get("event") == "SHUTDOWN":
                return str(ev.get("data", {}).get("reason", ""))
        return ""

    async def stop(self) -> VmExit:
        """Ask QEMU to quit over QMP; SIGKILL it if it has not gone within the grace time."""
        self._stopping = True
        if self.alive() and self.qmp is not None:
            try:
                await self.qmp.execute("quit", timeout=QUIT_GRACE_S)
            except QmpError:
                pass  # QEMU may close the socket before answering
        with trio.move_on_after(QUIT_GRACE_S):
            return await self.wait()
        _log.warning("qemu did not quit in time; killing it", pid=self.pid)
        return await self.kill()

    async def kill(self) -> VmExit:
        """SIGKILL QEMU (if still there), reap it, close QMP."""
        with trio.CancelScope(shield=True):
            if self.proc is None:
                return VmExit("stopped", "qemu was never started")
            if self.proc.poll() is None:
                self._stopping = True
                self.proc.kill()
            result = await self.wait()
            if self.qmp is not None:
                await self.qmp.aclose()
            return result


def kill_stale(state_dir: Path) -> int | None:
    """Kill the QEMU recorded in ``state_dir/qemu.pid`` if it still runs (after the shim died).

    Only a process whose command line names this state directory is killed,
    so a recycled pid is left alone.  Returns the pid killed, or None.
    """
    try:
        pid = int((state_dir / QEMU_PID).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if str(state_dir).encode() not in cmdline or b"qemu" not in cmdline.split(b"\0", 1)[0]:
        return None
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    _log.warning("killed a stale qemu", pid=pid, state_dir=str(state_dir))
    return pid
