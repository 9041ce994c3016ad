"""A container process's standard streams, as the agent holds them.

Either three pipes (the agent keeps stdin's write end and the read ends of
stdout and stderr), or a pseudo-terminal master received from crun over the
``--console-socket`` (SCM_RIGHTS, one fd, runtime-spec "terminal").  For a
tty process both ReadStdout and ReadStderr read the master (Kata agent
``do_read_stream``); after the last slave closes, Linux returns EIO from the
master, which is end of stream.
"""
from __future__ import annotations

import os
import socket
import struct
import threading

CONSOLE_RECV_TIMEOUT_S = 10.0
CANCEL_POLL_MS = 250


class StreamClosed(Exception):
    """The stream was closed by the agent (CloseStdin, or the container was removed)."""


MAX_SUN_PATH = 107
SHORT_SOCKET_DIR = "/run/katapy/console"


class ProcessIO:
    """Host side of one process's stdio; every method is safe to call from any thread."""

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self._lock = threading.Lock()
        self._stdin: int | None = None
        self._stdout: int | None = None
        self._stderr: int | None = None
        self._master: int | None = None
        # Child ends (pipes) or the console listener (tty), handed to crun.
        self.child_fds: dict[int, int] = {}
        self._console: socket.socket | None = None
        self.console_path: str | None = None

    # --- set-up -----------------------------------------------------------
    def prepare(self, work_dir: str, name: str) -> None:
        """Create the pipes, or the console socket crun will send the pty master to."""
        if self.terminal:
            # sun_path holds 107 bytes: a bundle path with a 64-character container id and an exec
            # name with a 64-character exec id does not fit, so the socket gets a short name of its own
            self.console_path = os.path.join(work_dir, f"console-{name}.sock")
            if len(self.console_path.encode()) > MAX_SUN_PATH:
                os.makedirs(SHORT_SOCKET_DIR, mode=0o700, exist_ok=True)
                self.console_path = os.path.join(SHORT_SOCKET_DIR, f"{os.urandom(8).hex()}.sock")
            try:
                os.unlink(self.console_path)
            except FileNotFoundError:
                pass
            self._console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._console.bind(self.console_path)
            self._console.listen(1)
            return
        in_r, self._stdin = os.pipe2(os.O_CLOEXEC)
        self._stdout, out_w = os.pipe2(os.O_CLOEXEC)
        self._stderr, err_w = os.pipe2(os.O_CLOEXEC)
        self.child_fds = {0: in_r, 1: out_w, 2: err_w}

    def after_spawn(self, succeeded: bool) -> None:
        """Drop the child's ends; for a tty, take the master crun sent (if it succeeded)."""
        for fd in set(self.child_fds.values()):
            os.close(fd)
        self.child_fds = {}
        if self._console is None:
            return
        try:
            if succeeded:
                self._console.settimeout(CONSOLE_RECV_TIMEOUT_S)
                conn, _ = self._console.accept()
                with conn:
                    conn.settimeout(CONSOLE_RECV_TIMEOUT_S)
                    _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
                if not fds:
                    raise OSError("crun sent no pty master on the console socket")
                for extra in fds[1:]:
                    os.close(extra)
                self._master = fds[0]
                os.set_inheritable(self._master, False)
        finally:
            self._console.close()
            self._console = None
            if self.console_path:
                try:
                    os.unlink(self.console_path)
                except FileNotFoundError:
                    pass

    # --- streams ----------------------------------------------------------
    def read(self, stream: str, max_len: int, cancelled: threading.Event | None = None) -> bytes:
        """Up to ``max_len`` bytes of stdout/stderr, blocking; b"" at end of stream.

        The wait polls ``cancelled`` (the ttrpc call's deadline passed or its
        connection closed): a read nobody will receive must not consume
        output, or the next reader would miss it.
        """
        import select

        fd = self._master if self.terminal else (self._stdout if stream == "stdout" else self._stderr)
        if fd is None:
            return b""
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while not poller.poll(CANCEL_POLL_MS):
            if cancelled is not None and cancelled.is_set():
                raise StreamClosed("read cancelled: the caller is gone")
        try:
            return os.read(fd, max_len)
        except OSError as exc:
            if exc.errno in (5, 9):  # EIO: pty slave gone; EBADF: closed under us
                return b""
            raise

    def write(self, data: bytes) -> int:
        fd = self._master if self.terminal else self._stdin
        if fd is None:
            raise StreamClosed("stdin is closed")
        try:
            return os.write(fd, data)
        except BrokenPipeError:
            raise StreamClosed("the process closed its stdin") from None

    def close_stdin(self) -> None:
        with self._lock:
            if self.terminal:
                if self._master is not None:
                    os.write(self._master, b"\x04")  # end of file on a tty in canonical mode
                return
            if self._stdin is not None:
                os.close(self._stdin)
                self._stdin = None

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import termios

        if self._master is None:
            raise StreamClosed("the process has no terminal")
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        """Release every fd (the container is being removed)."""
        with self._lock:
            for attr in ("_stdin", "_stdout", "_stderr", "_master"):
                fd = getattr(self, attr)
                if fd is not None:
                    setattr(self, attr, None)
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            for fd in set(self.child_fds.values()):
                os.close(fd)
            self.child_fds = {}
            if self._console is not None:
                self._console.close()
                self._console = None
                if self.console_path:
                    try:
                        os.unlink(self.console_path)
                    except OSError:
                        pass
