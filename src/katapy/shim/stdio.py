"""Bridge containerd's stdio FIFOs to the agent's stream calls (docs/protocols.md §1 and §4).

* stdout/stderr: a loop of ``ReadStdout``/``ReadStderr`` writes what the agent
  returns into the FIFO until the agent answers b"" (EOF).  In tty mode the
  agent reads the pty master whichever stream is asked, so only stdout runs.
* stdin: bytes read from the FIFO go to ``WriteStdin``.  The FIFO is opened
  read-write, so containerd closing its end is not an EOF; ``CloseIO`` (which
  containerd sends when its stdin ends) is: what is still buffered is
  forwarded, then ``CloseStdin``.
* The output FIFOs are closed as soon as their stream is drained, because
  containerd's client waits for EOF on them before it calls Delete.

FIFOs are opened O_RDWR (never blocks, whether or not containerd holds the
other end yet); URIs other than plain paths/``fifo://`` are refused.
"""
from __future__ import annotations

import errno
import os
from typing import Protocol

import trio

from katapy import log
from katapy.shim.errors import InvalidArgument
from katapy.shim.types import Stdio

READ_CHUNK = 32 * 1024
DRAIN_TIMEOUT_S = 10.0


class StreamAgent(Protocol):
    async def read_stdout(self, cid: str, exec_id: str, max_len: int) -> bytes: ...
    async def read_stderr(self, cid: str, exec_id: str, max_len: int) -> bytes: ...
    async def write_stdin(self, cid: str, exec_id: str, data: bytes) -> int: ...
    async def close_stdin(self, cid: str, exec_id: str) -> None: ...


def fifo_path(uri: str) -> str:
    """The FIFO path of a containerd stdio URI ("" stays "")."""
    if not uri:
        return ""
    if uri.startswith("fifo://"):
        return uri[len("fifo://"):]
    if "://" in uri:
        raise InvalidArgument(f"stdio {uri!r}: only FIFO paths are supported (binary:// and file:// are not)")
    return uri


def validate(stdio: Stdio) -> None:
    """Refuse stdio katapy cannot serve, before anything is created.

    With a terminal a stderr FIFO is left unused, as runc's shim does: a tty has
    one output stream, and containerd's CRI plugin names a stderr FIFO for a tty
    exec all the same (cio.NewFIFOSetInDir always fills in all three)."""
    for name in ("stdin", "stdout", "stderr"):
        fifo_path(getattr(stdio, name))
    if stdio.terminal and not stdio.stdout:
        raise InvalidArgument("terminal requested but no console: stdout is empty, nothing to attach the tty to")


def _open_fifo(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"open stdio fifo {path}: {exc.strerror}") from exc


class ProcessIO:
    """The stdio bridge of one process.  ``open`` at create/exec, ``start`` after the process starts."""

    def __init__(self, agent: StreamAgent, container_id: str, exec_id: str, stdio: Stdio) -> None:
        self.agent = agent
        self.cid = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self._fds: dict[str, int] = {}
        self._stdin_closed = trio.Event()
        self._outputs_done = trio.Event()
        self._closed = False
        self._log = log.get("shim.stdio", container_id=container_id, exec_id=exec_id)

    def open(self) -> None:
        validate(self.stdio)
        try:
            for name in ("stdin", "stdout", "stderr"):
                path = fifo_path(getattr(self.stdio, name))
                if path and not (name == "stderr" and self.stdio.terminal):
                    self._fds[name] = _open_fifo(path)
        except BaseException:
            self.close()
            raise

    def start(self, nursery: trio.Nursery) -> None:
        """Run the pumps in ``nursery``; outputs end at the agent's EOF."""
        outputs = [n for n in ("stdout", "stderr") if n in self._fds]
        if not outputs:
            self._outputs_done.set()
        remaining = {"n": len(outputs)}

        async def pump_out(name: str) -> None:
            try:
                await self._pump_output(name)
            finally:
                remaining["n"] -= 1
                if remaining["n"] == 0:
                    self._outputs_done.set()

        for name in outputs:
            nursery.start_soon(pump_out, name)
        if "stdin" in self._fds:
            nursery.start_soon(self._pump_stdin)

    async def _pump_output(self, name: str) -> None:
        read = self.agent.read_stdout if name == "stdout" else self.agent.read_stderr
        fd = self._fds[name]
        while True:
            try:
                data = await read(self.cid, self.exec_id, READ_CHUNK)
            except Exception as exc:  # the agent/VM went away: the stream is over
                self._log.info("output stream ended", stream=name, reason=str(exc))
                data = b""
            if not data:
                break
            view = memoryview(data)
            while view:
                if self._fds.get(name) != fd:
                    return  # close() gave up on this FIFO (drain timeout)
                try:
                    n = os.write(fd, view)
                    view = view[n:]
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_writable(fd)
                    except trio.ClosedResourceError:
                        return
                except OSError as exc:  # EPIPE cannot happen on an O_RDWR FIFO; anything else ends it
                    self._log.warning("fifo write failed", stream=name, error=exc.strerror)
                    view = view[len(view):]
        self._close_fd(name)

    async def _pump_stdin(self) -> None:
        fd = self._fds["stdin"]
        while True:
            if self._fds.get("stdin") != fd:
                return  # close() took the FIFO away (the process is gone): nothing left to forward
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                if self._stdin_closed.is_set():
                    break  # CloseIO and the FIFO is drained
                with trio.move_on_after(0.2):  # wake up to notice CloseIO
                    async with trio.open_nursery() as n:
                        async def readable() -> None:
                            try:
                                await trio.lowlevel.wait_readable(fd)
                            except trio.ClosedResourceError:
                                pass  # close() ran meanwhile; the loop's check sees it
                            n.cancel_scope.cancel()

                        async def closed() -> None:
                            await self._stdin_closed.wait()
                            n.cancel_scope.cancel()
                        n.start_soon(readable)
                        n.start_soon(closed)
                continue
            except OSError as exc:
                self._log.warning("stdin fifo read failed", error=exc.strerror)
                break
            if not data:
                break
            try:
                view = memoryview(data)
                while view:
                    n_written = await self.agent.write_stdin(self.cid, self.exec_id, bytes(view))
                    if n_written <= 0:
                        raise OSError(errno.EIO, "agent accepted no stdin bytes")
                    view = view[n_written:]
            except Exception as exc:
                self._log.info("stdin forwarding ended", reason=str(exc))
                self._close_fd("stdin")
                return
        self._close_fd("stdin")
        try:
            await self.agent.close_stdin(self.cid, self.exec_id)
        except Exception as exc:
            self._log.info("close_stdin failed", reason=str(exc))

    def close_stdin(self) -> None:
        """CloseIO(stdin): forward what is buffered, then close the process's stdin."""
        self._stdin_closed.set()

    async def wait_drained(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until stdout/stderr reached EOF; False if ``timeout`` passed first."""
        with trio.move_on_after(timeout):
            await self._outputs_done.wait()
            return True
        self._log.warning("output not drained in time; closing fifos", timeout_s=timeout)
        return False

    def _close_fd(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            try:
                trio.lowlevel.notify_closing(fd)
            except Exception:
                pass
            os.close(fd)

    def close(self) -> None:
        """Close every FIFO still open; idempotent."""
        for name in list(self._fds):
            self._close_fd(name)
        self._closed = True


