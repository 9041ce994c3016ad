"""Counts and latency of the requests a server answers, by method and outcome, for its metrics.

Written from the serving loop, read from the metrics endpoint's thread: one
lock around plain integers and floats.  Latency is a Prometheus summary
without quantiles (``_count`` and ``_sum``: rate(sum)/rate(count) is the
mean), which costs nothing per request beyond two additions.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric


class RequestStats:
    def __init__(self, prefix: str, what: str) -> None:
        self.prefix = prefix  # e.g. "katapy_shim_task"
        self.what = what  # e.g. "Task API requests containerd sent the shim"
        self._lock = threading.Lock()
        self._count: dict[tuple[str, str], int] = {}
        self._seconds: dict[str, tuple[int, float]] = {}

    def observe(self, method: str, ok: bool, seconds: float) -> None:
        key = (method, "ok" if ok else "error")
        with self._lock:
            self._count[key] = self._count.get(key, 0) + 1
            n, total = self._seconds.get(method, (0, 0.0))
            self._seconds[method] = (n + 1, total + seconds)

    def families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily  # on scrape, not at shim start

        with self._lock:
            counts, secs = dict(self._count), dict(self._seconds)
        c = CounterMetricFamily(f"{self.prefix}_requests", f"{self.what}, by method and outcome.",
                                labels=["method", "outcome"])
        for (method, outcome), n in sorted(counts.items()):
            c.add_metric([method, outcome], n)
        yield c
        s = SummaryMetricFamily(f"{self.prefix}_request_duration_seconds",
                                f"Time to answer the {self.what}, seconds.", labels=["method"])
        for method, (n, total) in sorted(secs.items()):
            s.add_metric([method], n, total)
        yield s
