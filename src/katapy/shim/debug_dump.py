"""SIGUSR1 on a running shim: its threads' stacks (and, when tracing, its allocation sites) into the shim log.

Kata's shim dumps its goroutine stacks to its log on SIGUSR1; katapy's does the same for its
threads (``sys._current_frames``: the trio thread, vCPU and device threads of the built-in VMM,
the stdio pumps).  When the shim runs with Python's allocation tracing on (``PYTHONTRACEMALLOC=N``
in containerd's environment, which the shim inherits), each dump also logs the top allocation
sites by size and how each grew since the previous dump: what an operator or a soak run needs to
find a leak in a long-lived shim (``kill -USR1 <shim pid>``; the lines land in containerd's log).
"""
from __future__ import annotations

import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

TOP_SITES = 25
MAX_FRAMES = 40


def thread_stacks() -> list[tuple[str, str]]:
    """(thread name, formatted stack) for every live thread of this process."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame, limit=MAX_FRAMES))
        out.append((names.get(ident, f"thread-{ident}"), stack))
    return out


@dataclass
class AllocationSites:
    """The top allocation sites of tracemalloc, diffed against the previous call's snapshot."""

    previous: Any = field(default=None)

    def lines(self, top: int = TOP_SITES) -> list[str] | None:
        """``None`` when tracemalloc is not tracing (the shim was started without PYTHONTRACEMALLOC)."""
        import tracemalloc

        if not tracemalloc.is_tracing():
            return None
        snap = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")))
        if self.previous is None:
            stats = snap.statistics("lineno")[:top]
            text = [f"{s.size} B in {s.count} blocks at {s.traceback}" for s in stats]
        else:
            diff = snap.compare_to(self.previous, "lineno")[:top]
            text = [f"{d.size} B ({d.size_diff:+d} B, {d.count_diff:+d} blocks) at {d.traceback}" for d in diff]
        self.previous = snap
        traced, peak = tracemalloc.get_traced_memory()
        return [f"traced {traced} B, peak {peak} B"] + text


def dump(logger: Any, sites: AllocationSites) -> None:
    """Log every thread's stack and, when tracing, the allocation sites (one line each)."""
    stacks = thread_stacks()
    for name, stack in stacks:
        logger.info("thread stack", thread=name, stack=stack)
    lines = sites.lines()
    if lines is None:
        logger.info("debug dump done", threads=len(stacks), tracemalloc="off (set PYTHONTRACEMALLOC=N to trace)")
        return
    for rank, line in enumerate(lines):
        logger.info("allocation site", rank=rank, site=line)
    logger.info("debug dump done", threads=len(stacks), tracemalloc="on")
