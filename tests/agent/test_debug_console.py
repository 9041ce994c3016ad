"""The guest's debug console server (katapy.agent.console.server) as a host process on a unix socket.

The server runs in a child process of its own with the agent's Reaper (which
reaps every child of its process, as PID 1 does in the guest); the test
speaks the wire format (katapy.protocol.debug_console) to it, as ``katapy exec``
does through the hybrid vsock.  The guest end to end is
tests/shim/test_ctr_debug_console.py.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from katapy import paths
from katapy.protocol import debug_console as wire

SERVER = """
import socket, sys, time
from katapy.agent.reaper import Reaper
from katapy.agent.console.server import ConsoleServer
reaper = Reaper(); reaper.start()
lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); lst.bind(sys.argv[1]); lst.listen(8)
ConsoleServer(lst, reaper).start()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def console(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "console.sock")
    env = {**os.environ, "PYTHONPATH": str(paths.REPO_ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield path
    finally:
        proc.kill()
        proc.wait()


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    return s


def _collect(sock: socket.socket, until: bytes | None = None) -> tuple[bytes, bytes, int | None, str | None]:
    """Frames until EXIT/ERROR (or until ``until`` appears in stdout): (stdout, stderr, status, error)."""
    reader = wire.FrameReader(sock, wire.GUEST_TYPES)
    out, err = b"", b""
    while (got := reader.next()) is not None:
        kind, payload = got
        if kind == wire.STDOUT:
            out += payload
            if until is not None and until in out:
                return out, err, None, None
        elif kind == wire.STDERR:
            err += payload
        elif kind == wire.EXIT:
            return out, err, wire.parse_exit(payload), None
        else:
            return out, err, None, wire.parse_error(payload)
    return out, err, None, None


def test_a_command_without_a_tty_keeps_stdout_and_stderr_apart_and_returns_its_status(console):
    with _connect(console) as s:
        s.sendall(wire.open_frame(wire.OpenRequest(["/bin/sh", "-c", "echo out; echo err >&2; read x; echo got:$x; exit 3"])))
        s.sendall(wire.frame(wire.STDIN, b"hello\n") + wire.frame(wire.STDIN_EOF))
        out, err, status, error = _collect(s)
    assert (out, err, status, error) == (b"out\ngot:hello\n", b"err\n", 3, None)


def test_a_tty_session_sees_its_size_and_the_resize(console):
    with _connect(console) as s:
        s.sendall(wire.open_frame(wire.OpenRequest(["/bin/sh"], tty=True, rows=24, cols=80, term="xterm")))
        s.sendall(wire.frame(wire.STDIN, b'tty; echo TERM=$TERM; stty size; echo EN""D1\n'))
        out, *_ = _collect(s, until=b"END1\r\n")
        assert b"/dev/pts/" in out and b"TERM=xterm" in out and b"24 80" in out, out
        s.sendall(wire.resize_frame(40, 120) + wire.frame(wire.STDIN, b'stty size; echo EN""D2\n'))
        out, *_ = _collect(s, until=b"END2\r\n")
        assert b"40 120" in out, out
        s.sendall(wire.frame(wire.STDIN, b"exit 5\n"))
        _, _, status, error = _collect(s)
    assert (status, error) == (5, None)


def test_a_signal_ends_the_command_with_128_plus_its_number(console):
    with _connect(console) as s:
        s.sendall(wire.open_frame(wire.OpenRequest(["/bin/sh", "-c", "kill -TERM $$"])))
        assert _collect(s)[2] == 128 + 15


def test_a_command_that_does_not_exist_gets_an_error_frame(console):
    with _connect(console) as s:
        s.sendall(wire.open_frame(wire.OpenRequest(["no-such-command-here"])))
        _, _, status, error = _collect(s)
    assert status is None and error and "no-such-command-here" in error


@pytest.mark.parametrize("first", [
    wire.frame(wire.STDIN, b"x"),  # before OPEN
    wire.frame(wire.OPEN, b"not json"),
    wire.frame(wire.OPEN, b'{"argv": [1, 2]}'),
    wire.frame(wire.OPEN, b'{"argv": ["/bin/true"], "rows": 70000}'),
    wire.HEADER.pack(wire.OPEN, wire.MAX_PAYLOAD + 1),  # an announced length past the limit
    wire.HEADER.pack(99, 0),  # an unknown type
])
def test_a_bad_first_frame_ends_that_session_and_the_server_goes_on(console, first):
    with _connect(console) as s:
        s.sendall(first)
        assert s.recv(1) == b""  # closed, nothing run
    with _connect(console) as s:
        s.sendall(wire.open_frame(wire.OpenRequest(["/bin/echo", "still-serving"])))
        assert _collect(s)[:3] == (b"still-serving\n", b"", 0)


def test_the_host_going_away_hangs_up_the_command(console):
    with _connect(console) as s:
        s.sendall(wire.open_frame(wire.OpenRequest(["/bin/sh", "-c", "echo $$; exec sleep 1000"], tty=True)))
        out, *_ = _collect(s, until=b"\n")
        pid = int(out.split()[0])
        assert Path(f"/proc/{pid}").exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), f"the session's command {pid} outlived its console"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_frame_over_the_limit_is_refused_by_the_encoder():
    with pytest.raises(wire.ConsoleProtocolError):
        wire.frame(wire.STDOUT, b"x" * (wire.MAX_PAYLOAD + 1))
