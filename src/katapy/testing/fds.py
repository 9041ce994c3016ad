"""File-descriptor leak checks for tests that share the process with long-lived fixtures.

A session-scoped guest (tests/virtio) keeps device servers running in the
test process; they open and close descriptors of their own at any time (a
virtio-fs server drops an inode's fd when the guest sends FORGET).  Counting
/proc/self/fd then fails a test for another fixture's activity.  A leak is
instead a descriptor present now that was not there before, with the same
target, which other fixtures closing theirs cannot produce.
"""
from __future__ import annotations

import os
import time

FdTable = dict[int, str]


def snapshot() -> FdTable:
    """This process's open descriptors: fd -> what it refers to (readlink of /proc/self/fd/N)."""
    out: FdTable = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile (listdir's own directory fd among them)
            continue
    return out


def leaked(before: FdTable) -> list[str]:
    """Descriptors open now that were not open (to the same target) in ``before``."""
    return sorted(f"{fd} -> {target}" for fd, target in snapshot().items() if before.get(fd) != target)


def wait_released(before: FdTable, timeout: float = 5.0) -> None:
    """Wait until nothing opened since ``before`` is still open; AssertionError naming them if it stays."""
    deadline = time.monotonic() + timeout
    while (extra := leaked(before)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not extra, f"file descriptors left open: {extra}"
