"""The guest's end of the debug console: each connection runs one command (or the shell) in the VM.

Started by the agent only when the kernel command line says
``katapy.debug_console=1`` (the host's ``debug_console = true``); it is
Kata's debug console (``agent.debug_console``), a way into the VM itself,
not into a container: the command runs in the guest's own namespaces as
root.  Framing: :mod:`katapy.protocol.debug_console`.

Per connection:

1. read OPEN within ``OPEN_TIMEOUT_S``;
2. with ``tty``: a new pty whose slave becomes the process's controlling
   terminal (posix_spawn with setsid, then open(2) of the slave in the child,
   which acquires it), sized from OPEN; without: three pipes;
3. one thread copies the host's frames to stdin / TIOCSWINSZ, this one the
   process's output to frames; at the end of the output the exit status from
   the agent's reaper (the agent is PID 1: it alone may waitpid) goes back
   as EXIT;
4. the host going away hangs up the process's session (SIGHUP to its process
   group, SIGKILL after ``HANGUP_GRACE_S``), so no shell outlives its console.

At most ``MAX_SESSIONS`` at once; a bad frame ends that session only.
"""
from __future__ import annotations

import os
import socket
import threading

from katapy.agent import log
from katapy.agent.acceptor import Acceptor

MAX_SESSIONS = 8
OPEN_TIMEOUT_S = 10.0
HANGUP_GRACE_S = 1.0
CHUNK = 16 * 1024
SHELL = ["/bin/sh", "-l"]
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ConsoleServer(Acceptor):
    """Accepts debug-console streams on ``listener``; processes are spawned and reaped through ``reaper``."""

    name = "debug-console"

    def __init__(self, listener: socket.socket, reaper) -> None:  # type: ignore[no-untyped-def]
        super().__init__(listener, MAX_SESSIONS)
        self.reaper = reaper

    def refuse(self, conn: socket.socket) -> None:
        from katapy.protocol import debug_console as wire

        _send_quietly(conn, wire.error_frame(f"too many debug console sessions (limit {MAX_SESSIONS})"))

    def handle(self, conn: socket.socket) -> None:
        from katapy.protocol import debug_console as wire

        try:
            Session(conn, self.reaper).run()
        except (OSError, wire.ConsoleProtocolError) as exc:
            log.warning("debug console session ended", error=str(exc))
        finally:
            conn.close()


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass


class Session:
    """One command and its streams."""

    def __init__(self, conn: socket.socket, reaper) -> None:  # type: ignore[no-untyped-def]
        self.conn = conn
        self.reaper = reaper
        self.pid = 0
        self._send_lock = threading.Lock()
        self._stdin = -1  # our end: the pty master or the stdin pipe's write end
        self._master = -1

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.conn.sendall(data)

    def run(self) -> None:
        from katapy.protocol import debug_console as wire

        self.conn.settimeout(OPEN_TIMEOUT_S)
        first = wire.FrameReader(self.conn, wire.HOST_TYPES).next()
        self.conn.settimeout(None)
        if first is None:
            return
        kind, payload = first
        if kind != wire.OPEN:
            raise wire.ConsoleProtocolError(f"frame type {kind} before OPEN")
        req = wire.parse_open(payload)
        try:
            outputs = self._spawn(req)
        except OSError as exc:
            self.send(wire.error_frame(f"cannot start {req.argv or SHELL}: {exc.strerror or exc}"))
            return
        log.info("debug console session", argv=" ".join(req.argv) or "shell", tty=req.tty, pid=self.pid)
        feeder = threading.Thread(target=self._feed, name="debug-console-input", daemon=True)
        feeder.start()
        try:
            self._pump(outputs)
            pid, status = self.pid, self.reaper.wait(self.pid)
            self.pid = 0
            self.reaper.forget(pid)
            self.send(wire.exit_frame(status if status is not None else 255))
        finally:
            self._hang_up()
            try:  # wakes the input thread's recv; it must be gone before its fds are closed
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            feeder.join(HANGUP_GRACE_S + 1)
            for fd in (self._stdin, *outputs):
                _close(fd)
            self._stdin = -1

    # -- the process --------------------------------------------------------------
    def _spawn(self, req) -> list[int]:  # type: ignore[no-untyped-def]
        """Start the command; our ends of its output (one fd with a tty, stdout and stderr without)."""
        argv = req.argv or SHELL
        env = {"PATH": ENV_PATH, "HOME": "/root", "TERM": req.term, "USER": "root", "SHELL": SHELL[0]}
        path = argv[0] if "/" in argv[0] else _which(argv[0])
        if path is None:
            raise FileNotFoundError(2, f"{argv[0]}: not found in {ENV_PATH}")
        if req.tty:
            import fcntl
            import struct
            import termios

            master, slave = os.openpty()
            os.set_inheritable(master, False)
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", req.rows, req.cols, 0, 0))
            slave_path = os.ttyname(slave)
            os.close(slave)  # the child opens it after setsid(2): open(2) then makes it its controlling tty
            actions = [(os.POSIX_SPAWN_OPEN, 0, slave_path, os.O_RDWR, 0),
                       (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]
            try:
                self.pid = os.posix_spawn(path, argv, env, file_actions=actions, setsid=True)
            except OSError:
                os.close(master)
                raise
            self.reaper.claim(self.pid)
            self._stdin = self._master = master
            return [master]
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
        actions = [(os.POSIX_SPAWN_DUP2, pipes[0][0], 0), (os.POSIX_SPAWN_DUP2, pipes[1][1], 1),
                   (os.POSIX_SPAWN_DUP2, pipes[2][1], 2)]
        try:
            self.pid = os.posix_spawn(path, argv, env, file_actions=actions, setsid=True)
        except OSError:
            for r, w in pipes:
                _close(r)
                _close(w)
            raise
        finally:
            for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):
                _close(fd)
        self.reaper.claim(self.pid)
        self._stdin = pipes[0][1]
        return [pipes[1][0], pipes[2][0]]

    def _pump(self, outputs: list[int]) -> None:
        """Copy the process's output into frames until every output has ended."""
        import select

        from katapy.protocol import debug_console as wire

        kinds = {outputs[0]: wire.STDOUT}
        if len(outputs) > 1:
            kinds[outputs[1]] = wire.STDERR
        open_fds = list(outputs)
        while open_fds:
            ready, _, _ = select.select(open_fds, [], [])
            for fd in ready:
                try:
                    data = os.read(fd, CHUNK)
                except OSError:  # EIO: a pty master once every slave fd is closed
                    data = b""
                if data:
                    self.send(wire.frame(kinds[fd], data))
                else:
                    open_fds.remove(fd)

    def _feed(self) -> None:
        """The host's frames: stdin bytes, EOF and window sizes; the host gone hangs the session up."""
        from katapy.protocol import debug_console as wire

        reader = wire.FrameReader(self.conn, wire.HOST_TYPES)
        try:
            while (got := reader.next()) is not None:
                kind, payload = got
                if kind == wire.STDIN and self._stdin >= 0:
                    _write_all(self._stdin, payload)
                elif kind == wire.STDIN_EOF and self._master < 0 and self._stdin >= 0:
                    os.close(self._stdin)
                    self._stdin = -1
                elif kind == wire.STDIN_EOF and self._master >= 0:
                    _write_all(self._master, b"\x04")  # the tty's EOF character (VEOF, ^D)
                elif kind == wire.RESIZE and self._master >= 0:
                    import fcntl
                    import struct
                    import termios

                    rows, cols = wire.parse_resize(payload)
                    fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                elif kind == wire.OPEN:
                    raise wire.ConsoleProtocolError("a second OPEN")
        except (OSError, wire.ConsoleProtocolError) as exc:
            log.debug("debug console input ended", error=str(exc))
        self._hang_up()

    def _hang_up(self) -> None:
        """SIGHUP to the session's process group, SIGKILL if it is still there after the grace time."""
        pid = self.pid
        if pid <= 0 or self.reaper.poll(pid) is not None:
            return
        import signal

        for sig in (signal.SIGHUP, signal.SIGCONT):
            try:
                os.killpg(pid, sig)  # setsid made the process its group's leader
            except OSError:
                pass
        if self.reaper.wait(pid, HANGUP_GRACE_S) is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def _which(name: str) -> str | None:
    for d in ENV_PATH.split(":"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK) and not os.path.isdir(p):
            return p
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
