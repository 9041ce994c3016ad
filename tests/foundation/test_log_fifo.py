"""katapy.log.FifoStream: the shim's log on containerd's FIFO survives containerd going away and coming back."""
from __future__ import annotations

import os
from pathlib import Path

import structlog

from katapy import log


def test_lines_written_while_nobody_reads_are_dropped_not_raised(tmp_path: Path) -> None:
    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # containerd, before it stops
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    stream = log.FifoStream(fd)
    # Loggers bound at import time hold structlog's processor list itself; restoring that very list
    # (not a copy) afterwards keeps structlog.testing.capture_logs working in every later test.
    saved = structlog.get_config()
    log.configure("info", stream)  # type: ignore[arg-type]
    try:
        lg = log.get("test")
        lg.info("before")
        assert b"event='before'" in os.read(reader, 4096)
        os.close(reader)  # containerd stopped: write(2) now fails with EPIPE
        lg.info("while down")  # must not raise BrokenPipeError into the caller
        assert stream.dropped == 1
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # containerd restarted and reopened it
        lg.info("after")
        got = os.read(reader, 4096)
        assert got.count(b"\n") == 1 and b"event='after'" in got and b"while down" not in got, got
    finally:
        structlog.configure(**saved)
        os.close(reader)
        stream.close()
