"""``katapy exec`` into a sandbox started by containerd with ``debug_console = true``: a command with its
status and separate streams, a shell on a pty with a resize, and the refusals (no such sandbox, console
off, VMM gone), and the shim's SIGUSR1 debug dump.  The configured backend (QEMU microvm under TCG on this host).
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from katapy.shim.persist import SandboxRecord

from .containerd import PrivateContainerd, private_containerd, shim_pids
from .test_ctr_run import BOOT_TIMEOUT, IMAGE, RUNTIME, _leftovers, _require_guest

CID = "kr-console"
KATAPY_EXEC = [sys.executable, "-m", "katapy.cli", "exec"]


@pytest.fixture(scope="module")
def console_containerd() -> Iterator[PrivateContainerd]:
    """A private containerd whose shims read a configuration with ``debug_console = true``."""
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    etc = Path(tempfile.mkdtemp(prefix="katapy-dbgcfg-", dir="/tmp"))
    cfg = etc / "configuration.toml"
    cfg.write_text("[hypervisor]\ndebug_console = true\n")
    try:
        with private_containerd({"KATAPY_CONFIG": str(cfg)}) as c:
            yield c
    finally:
        shutil.rmtree(etc, ignore_errors=True)


def _exec(c: PrivateContainerd, *args: str, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([*KATAPY_EXEC, "--state-dir", str(c.katapy_state), *args], capture_output=True, text=True,
                          timeout=120, env=c.env(), **kw)


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} never came; got {out!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other end closed
                break
            if not chunk:
                break
            out += chunk
    return out


@pytest.mark.containerd
@pytest.mark.guest
@pytest.mark.slow
def test_katapy_exec_runs_commands_and_a_resizable_shell_in_the_vm(console_containerd: PrivateContainerd) -> None:
    _require_guest()
    c = console_containerd
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, CID, "sleep", "600", timeout=BOOT_TIMEOUT)
    try:
        rec = json.loads((c.katapy_state / CID / "sandbox.json").read_text())
        assert rec["debug_console"] is True and rec["agent_socket"]

        # a command: its streams apart, its status; it runs in the VM (PID 1 there is the agent)
        r = _exec(c, CID, "sh", "-c", "echo out; echo err >&2; tr -d '\\n' < /proc/1/cmdline; exit 3")
        assert r.returncode == 3, r.stderr
        assert r.stdout.startswith("out\n") and "katapy.agent" in r.stdout and r.stderr == "err\n", (r.stdout, r.stderr)
        r = _exec(c, CID, "cat", input="through stdin\n")
        assert (r.returncode, r.stdout) == (0, "through stdin\n"), r.stderr

        # a shell on a terminal: its size, a resize (SIGWINCH to katapy exec), its exit status
        master, slave = pty.openpty()
        _set_size(slave, 30, 100)
        proc = subprocess.Popen([*KATAPY_EXEC, "--state-dir", str(c.katapy_state), CID], stdin=slave, stdout=slave,
                                stderr=slave, env=c.env(), start_new_session=True)
        os.close(slave)
        try:
            _read_until(master, b"# ")  # the guest shell's prompt
            os.write(master, b'tty; stty size; echo EN""D1\n')
            out = _read_until(master, b"END1")
            assert b"/dev/pts/" in out and b"30 100" in out, out
            _set_size(master, 50, 132)
            proc.send_signal(signal.SIGWINCH)
            time.sleep(0.5)
            os.write(master, b'stty size; echo EN""D2\n')
            out = _read_until(master, b"END2")
            assert b"50 132" in out, out
            os.write(master, b"exit 7\n")
            assert proc.wait(timeout=60) == 7
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)

        # the VM's side is gone with the session: no shell of the console is left in the guest
        r = _exec(c, CID, "sh", "-c", "ps -o pid,args | grep -c '[/]bin/sh -l' || true")
        assert r.stdout.strip() == "0", r.stdout

        # SIGUSR1 on the shim: its threads' stacks into containerd's log, and it keeps serving
        (shim,) = shim_pids(c.katapy_state)
        os.kill(shim, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while "debug dump done" not in c.log_path.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.2)
        text = c.log_path.read_text(errors="replace")
        assert "event='thread stack'" in text and "_dump_on_sigusr1" in text, text[-3000:]
        assert "tracemalloc='off" in text, text[-3000:]
        assert c.ctr("task", "exec", "--exec-id", "after-dump", CID, "true", check=False).returncode == 0
    finally:
        c.ctr("task", "kill", "-s", "SIGKILL", CID, check=False)
        c.ctr("task", "delete", "-f", CID, check=False)
        c.ctr("containers", "rm", CID, check=False)
    assert not _leftovers(c)
    r = _exec(c, CID, "true")  # the sandbox is gone: a clear refusal
    assert r.returncode == 125 and f"no sandbox '{CID}'" in r.stderr, r.stderr


def test_katapy_exec_refuses_a_sandbox_without_the_console_and_a_gone_vmm(tmp_path: Path) -> None:
    def katapy_exec(sid: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*KATAPY_EXEC, "--state-dir", str(tmp_path), sid, "true"], capture_output=True,
                              text=True, timeout=60)

    r = katapy_exec("nosuch")
    assert r.returncode == 125 and "no sandbox 'nosuch'" in r.stderr, r.stderr
    r = katapy_exec("../etc")
    assert r.returncode == 125 and "no sandbox" in r.stderr, r.stderr
    off = tmp_path / "off"
    SandboxRecord("off", str(off), str(off / "shared"), agent_socket=str(off / "vsock.sock")).save()
    r = katapy_exec("off")
    assert r.returncode == 125 and "debug_console = true" in r.stderr, r.stderr
    gone = tmp_path / "gone"
    SandboxRecord("gone", str(gone), str(gone / "shared"), agent_socket=str(gone / "vsock.sock"),
                  debug_console=True).save()
    r = katapy_exec("gone")
    assert r.returncode == 125 and "cannot reach the VMM" in r.stderr, r.stderr
