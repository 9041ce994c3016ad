"""Shared reporting for benchmarks: every number is a ratio against a reference measured in the same run."""
from __future__ import annotations

import os
import shlex
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


def hardware_kvm_missing() -> str | None:
    """None on hardware-style KVM; else this host's KVM flavour (e.g. kvm-pvm), which cannot run Linux guests."""
    from katapy.vmm.kvm.host import kvm_flavor

    flavor = kvm_flavor()
    return None if flavor.startswith("hardware") else flavor


def in_harness(module: str, argv: list[str], timeout: float) -> int:
    """Re-run ``python -m benchmarks.<module> --here ARGV`` inside the nested KVM harness; its exit code."""
    from pathlib import Path

    from katapy.testing import harness

    ok, why = harness.available()
    if not ok:
        print(f"{module}: needs hardware-style KVM or the nested harness: {why}")
        return 2
    py = os.path.relpath(sys.executable, Path.cwd()) if sys.executable.startswith(str(Path.cwd())) else sys.executable
    cmd = f"{py} -m benchmarks.{module} --here {shlex.join(argv)}"
    print(f"(running inside the nested KVM harness: {cmd})", flush=True)
    r = harness.run_in_kvm_vm(cmd, timeout=timeout, stream=True)
    return r.returncode if r.returncode >= 0 else 1
