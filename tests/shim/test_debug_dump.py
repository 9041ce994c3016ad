"""katapy.shim.debug_dump: every thread's stack, and allocation sites diffed between dumps when tracing."""
from __future__ import annotations

import threading
import tracemalloc

import structlog

from katapy.shim.debug_dump import AllocationSites, dump, thread_stacks


def test_thread_stacks_name_every_thread_and_show_where_it_waits() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="katapy-vcpu7")
    t.start()
    try:
        stacks = dict(thread_stacks())
    finally:
        stop.set()
        t.join()
    assert "katapy-vcpu7" in stacks and "wait" in stacks["katapy-vcpu7"]
    assert "test_thread_stacks_name_every_thread" in stacks[threading.current_thread().name]


def test_allocation_sites_are_off_without_tracing_and_diff_while_tracing() -> None:
    assert not tracemalloc.is_tracing()
    assert AllocationSites().lines() is None
    tracemalloc.start()
    try:
        sites = AllocationSites()
        first = sites.lines(top=5)
        assert first is not None and first[0].startswith("traced ")
        hoard = [bytearray(1000) for _ in range(2000)]  # ~2 MB held at one line: the top growth after
        second = sites.lines(top=5)
        assert second is not None and "test_debug_dump.py" in second[1] and "+2" in second[1], second
        del hoard
    finally:
        tracemalloc.stop()


def test_dump_logs_stacks_then_a_summary() -> None:
    with structlog.testing.capture_logs() as logs:
        dump(structlog.get_logger("t"), AllocationSites())
    events = [e["event"] for e in logs]
    assert events.count("thread stack") >= 1 and events[-1] == "debug dump done"
    assert logs[-1]["tracemalloc"].startswith("off")
