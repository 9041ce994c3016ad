"""Shared reporting for benchmarks: every number is a ratio against a reference measured in the same run."""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Comparison:
    name: str
    ours_label: str
    ours: list[float]  # samples, seconds (or the unit given)
    ref_label: str
    ref: list[float]
    unit: str = "s"
    command: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(self.ours) / statistics.median(self.ref)

    def line(self) -> str:
        def fmt(xs: list[float]) -> str:
            m = statistics.median(xs)
            if self.unit == "s":
                return f"{m * 1e3:.2f} ms" if m < 1 else f"{m:.2f} s"
            return f"{m:.3g} {self.unit}"

        return (f"{self.name}: {self.ours_label} {fmt(self.ours)} vs {self.ref_label} {fmt(self.ref)} "
                f"-> ratio {self.ratio:.2f} (n={len(self.ours)}/{len(self.ref)}; median)"
                + (f"\n    reproduce: {self.command}" if self.command else ""))


def sample(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def report(c: Comparison) -> None:
    print(c.line(), flush=True)


def header(title: str) -> None:
    print(f"\n== {title} ==", file=sys.stdout, flush=True)
