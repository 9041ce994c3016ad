"""`make bench`: run every benchmark module (benchmarks/bench_*.py and friends) and print their ratios.

Each module has ``main(argv) -> int``; ``python -m benchmarks.run NAME...`` runs only those.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def modules() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in ("run", "common", "__init__"))


def main(argv: list[str]) -> int:
    names = argv or modules()
    failed = []
    for name in names:
        t0 = time.monotonic()
        print(f"\n##### benchmarks.{name}  (python -m benchmarks.{name})", flush=True)
        try:
            rc = importlib.import_module(f"benchmarks.{name}").main([])
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            print(f"benchmarks.{name}: FAILED: {exc!r}")
            rc = 1
        if rc:
            failed.append(name)
        print(f"##### {name}: {time.monotonic() - t0:.0f} s, exit {rc}", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
