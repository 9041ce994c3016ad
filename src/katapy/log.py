"""structlog set-up: key=value lines, to stderr or to a file (containerd's log FIFO)."""
from __future__ import annotations

import logging
import os
import sys
from typing import IO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class FifoStream:
    """A write-only text stream on a FIFO's fd (containerd's ``log`` FIFO for the shim) that never raises.

    containerd is the only reader: while it is stopped or restarting there is none, and write(2) fails
    with EPIPE (fifo(7)); a log line must then be dropped, not raised into whatever code logged it (an
    exit watcher, a ttrpc connection) -- the shim outlives containerd and keeps serving.  A new reader
    (containerd restarted) gets the lines written after it opened the FIFO.  Writes block while the
    pipe is full, as before: containerd reads continuously.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dropped = 0
        self._pending = ""  # print() writes a line and its newline apart: one write(2) per whole line

    def write(self, text: str) -> int:
        self._pending += text
        end = self._pending.rfind("\n") + 1
        if end:
            data, self._pending = self._pending[:end].encode("utf-8", "replace"), self._pending[end:]
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError:  # EPIPE: nobody reads now; EAGAIN/EBADF: the line is lost, never the caller
                self.dropped += 1
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """Route katapy's structured logs as ``key=value`` lines to ``stream``."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            structlog.processors.KeyValueRenderer(key_order=["time", "level", "event"], sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str, **bound: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name).bind(component=name, **bound)
