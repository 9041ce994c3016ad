"""``katapy exec SANDBOX_ID [CMD...]``: a shell, or one command, in a sandbox's VM (Kata's ``kata-runtime exec``).

The sandbox must have been started with ``debug_console = true`` under
``[hypervisor]``; its record (``<state_dir>/<id>/sandbox.json``,
katapy.shim.persist) says so and names the VMM's hybrid-vsock socket, where
this dials guest port 1027 (``CONNECT 1027``) and speaks
katapy.protocol.debug_console.  Without CMD it opens the guest's shell.

With a terminal on stdin and stdout (or ``-t``) the guest gives the command a
pty of this terminal's size; this terminal goes raw for the session and a
SIGWINCH sends the new size.  Otherwise (or ``-T``) stdout and stderr stay
separate.  The exit status is the command's; katapy's own failures exit 125
(no such sandbox, console off, guest not answering), a command that could
not start 126.  The guest's bytes are checked like any untrusted input
(frame types, lengths).
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
from pathlib import Path

from katapy import config
from katapy.protocol import debug_console as wire

CONNECT_TIMEOUT_S = 10.0
KATAPY_FAILED = 125
COULD_NOT_START = 126
CLOSED_WITHOUT_STATUS = 255


class ConsoleError(Exception):
    """katapy exec cannot give a console: the message says why and what to do."""


def locate(state_dir: Path, sandbox_id: str):  # type: ignore[no-untyped-def]
    """The sandbox's record; ConsoleError when there is none or its console is off."""
    from katapy.shim.persist import SandboxRecord

    d = state_dir / sandbox_id
    rec = None if "/" in sandbox_id or sandbox_id in ("", ".", "..") else SandboxRecord.load(d)
    if rec is None:
        raise ConsoleError(f"no sandbox {sandbox_id!r} in {state_dir} (`katapy sandbox list` shows the running ones)")
    if not rec.debug_console:
        raise ConsoleError(f"sandbox {sandbox_id!r} was started without the debug console: set "
                           "debug_console = true under [hypervisor] in the configuration (it applies to "
                           "sandboxes started after the change)")
    if not rec.agent_socket:
        raise ConsoleError(f"sandbox {sandbox_id!r} has no VM socket in its record (its VM is not running)")
    return rec


def dial(agent_socket: str, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A stream to the guest's debug console port through the VMM's hybrid vsock."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(agent_socket)
        except OSError as exc:
            raise ConsoleError(f"cannot reach the VMM at {agent_socket}: {exc.strerror or exc}") from None
        sock.sendall(f"CONNECT {wire.DEBUG_CONSOLE_PORT}\n".encode())
        line = b""
        try:
            while not line.endswith(b"\n") and len(line) < 64:
                byte = sock.recv(1)
                if not byte:
                    break
                line += byte
        except TimeoutError:
            raise ConsoleError(f"the VMM did not answer CONNECT {wire.DEBUG_CONSOLE_PORT} within {timeout:.0f} s") from None
        if not line.startswith(b"OK"):
            raise ConsoleError(f"the guest does not serve the debug console on vsock port {wire.DEBUG_CONSOLE_PORT} "
                               f"(VMM said {line.strip()!r}); is its agent running?")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


class Terminal:
    """This process's terminal made raw for a session, restored after; SIGWINCH noted on a pipe."""

    def __init__(self) -> None:
        import termios
        import tty

        self._saved = termios.tcgetattr(0)
        tty.setraw(0, termios.TCSANOW)  # not TCSAFLUSH: what was typed ahead still goes to the guest
        self.wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_handler = signal.signal(signal.SIGWINCH, self._on_winch)

    def _on_winch(self, signum, frame) -> None:  # type: ignore[no-untyped-def]
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass

    @staticmethod
    def size() -> tuple[int, int]:
        s = os.get_terminal_size(1)
        return s.lines, s.columns

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def restore(self) -> None:
        import termios

        signal.signal(signal.SIGWINCH, self._old_handler)
        termios.tcsetattr(0, termios.TCSADRAIN, self._saved)
        os.close(self.wake_r)
        os.close(self._wake_w)


def session(sock: socket.socket, argv: list[str], tty: bool) -> int:
    """Run ``argv`` (empty: the shell) over ``sock``; the exit status to return."""
    term = Terminal() if tty and os.isatty(0) and os.isatty(1) else None  # -t without a terminal: 24x80
    try:
        rows, cols = Terminal.size() if term else (24, 80)
        sock.sendall(wire.open_frame(wire.OpenRequest(argv, tty, rows, cols, os.environ.get("TERM", "linux"))))
        reader = wire.FrameReader(sock, wire.GUEST_TYPES)
        stdin_open = True
        while True:
            watch = [sock] + ([0] if stdin_open else []) + ([term.wake_r] if term else [])
            ready, _, _ = select.select(watch, [], [])
            if term and term.wake_r in ready:
                term.drain_wakeups()
                sock.sendall(wire.resize_frame(*Terminal.size()))
            if 0 in ready:
                data = os.read(0, 16 * 1024)
                sock.sendall(wire.frame(wire.STDIN, data) if data else wire.frame(wire.STDIN_EOF))
                stdin_open = bool(data)
            if sock in ready:
                got = reader.next()
                if got is None:
                    print("katapy exec: the guest closed the console without an exit status", file=sys.stderr)
                    return CLOSED_WITHOUT_STATUS
                kind, payload = got
                if kind == wire.STDOUT:
                    _write_all(1, payload)
                elif kind == wire.STDERR:
                    _write_all(2, payload)
                elif kind == wire.EXIT:
                    return wire.parse_exit(payload) & 0xFF
                else:  # ERROR
                    print(f"katapy exec: {wire.parse_error(payload)}", file=sys.stderr)
                    return COULD_NOT_START
    finally:
        if term:
            term.restore()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="katapy exec", description="a shell or a command in a sandbox's VM "
                                 "(needs debug_console = true)")
    ap.add_argument("-t", "--tty", action="store_true", help="give the command a terminal even if stdin is none")
    ap.add_argument("-T", "--no-tty", action="store_true", help="no terminal: stdout and stderr kept apart")
    ap.add_argument("--state-dir", type=Path, help="the shims' state directory (default: [runtime] state_dir)")
    ap.add_argument("sandbox_id")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="what to run (default: the guest's shell)")
    args = ap.parse_args(argv)
    try:
        state_dir = args.state_dir or Path(config.load(check_files=False).runtime.state_dir)
        rec = locate(state_dir, args.sandbox_id)
        tty = args.tty or (not args.no_tty and os.isatty(0) and os.isatty(1))
        sock = dial(rec.agent_socket)
    except (ConsoleError, config.ConfigError) as exc:
        print(f"katapy exec: {exc}", file=sys.stderr)
        return KATAPY_FAILED
    try:
        return session(sock, list(args.command), tty)
    except (OSError, wire.ConsoleProtocolError) as exc:
        print(f"katapy exec: console lost: {exc}", file=sys.stderr)
        return KATAPY_FAILED
    finally:
        sock.close()
