"""Run the fuzz targets: ``python -m fuzz.run [--target NAME] [--seconds N | --cases N] [--engine E]``.

Engines:

* ``atheris`` (the default when it is installed): coverage-guided libFuzzer
  through atheris, katapy and the harnesses instrumented.  Each target runs in
  its own worker process (``--worker NAME``), seeded from
  ``fuzz/corpus/<target>/``; what it learns goes to a scratch corpus, crashers
  to ``fuzz/crashes/<target>/``.
* ``mutate``: a corpus-seeded random mutation driver (bit flips, byte
  insertion and deletion, splices, boundary values), in this process; what the
  fast test in tests/fuzz uses, and the fallback without atheris.

Every case is bounded by CASE_TIMEOUT_S (a hang is a crash).  Prints one line
per target: cases run, seconds, cases per second, crashes; exits 1 if any
target crashed.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"
CRASHES = ROOT / "crashes"
CASE_TIMEOUT_S = 10.0
MAX_LEN = 4096


@dataclass
class Result:
    target: str
    cases: int = 0
    seconds: float = 0.0
    crashes: list[str] = field(default_factory=list)  # descriptions (and where the input was saved)

    @property
    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"{self.target:<12} cases {self.cases:>8}  seconds {self.seconds:>7.1f}  "
                f"cases/s {self.rate:>7.0f}  crashes {len(self.crashes)}")


def load_target(name: str) -> Callable[[bytes], None]:
    if name not in TARGETS:
        raise SystemExit(f"unknown fuzz target {name!r} (known: {', '.join(TARGETS)})")
    return importlib.import_module(f"fuzz.targets.{name}").fuzz_one


def corpus(name: str) -> list[bytes]:
    d = CORPUS / name
    return [p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()] if d.is_dir() else []


def bounded(fuzz_one: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """``fuzz_one`` with every case bounded by CASE_TIMEOUT_S."""
    from fuzz.common import time_bound

    def one(data: bytes) -> None:
        with time_bound(CASE_TIMEOUT_S):
            fuzz_one(data)

    return one


def save_crash(name: str, data: bytes) -> Path:
    d = CRASHES / name
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
    p.write_bytes(data)
    return p


# -- the mutation driver -------------------------------------------------------------
_BOUNDARIES = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff", b"\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
               b"\x10\x00", b"\x00\x10")


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(1 + rng.randrange(4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # a random byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.randbytes(1 + rng.randrange(8))
        elif op == 3 and buf:  # delete a run
            del buf[pos : pos + 1 + rng.randrange(8)]
        elif op == 4:  # a boundary value
            v = rng.choice(_BOUNDARIES)
            buf[pos : pos + len(v)] = v
        elif op == 5 and pool:  # splice with another input
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        else:  # duplicate a run
            n = 1 + rng.randrange(16)
            buf[pos:pos] = buf[pos : pos + n]
    return bytes(buf[:MAX_LEN])


def run_mutate(name: str, cases: int | None, seconds: float | None, seed: int = 0) -> Result:
    """The mutation driver for ``name``: corpus first, then mutants, until ``cases`` or ``seconds``."""
    from fuzz.common import quiet_logs

    one = bounded(load_target(name))
    rng = random.Random(seed)
    seeds = corpus(name) or [b""]
    pool = list(seeds)
    res = Result(name)
    start = time.monotonic()
    with quiet_logs():
        i = 0
        while True:
            if cases is not None and res.cases >= cases:
                break
            if seconds is not None and time.monotonic() - start >= seconds:
                break
            data = seeds[i] if i < len(seeds) else mutate(rng, rng.choice(pool), pool)
            i += 1
            try:
                one(data)
            except Exception as e:  # anything that is not the target's clean error is a crash
                where = save_crash(name, data)
                res.crashes.append(f"{type(e).__name__}: {e} (input saved as {where})\n{traceback.format_exc()}")
            else:
                if rng.randrange(64) == 0 and len(pool) < 512:
                    pool.append(data)  # keep some mutants: a cheap stand-in for coverage feedback
            res.cases += 1
    res.seconds = time.monotonic() - start
    return res


# -- the atheris engine ------------------------------------------------------------------
def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def worker(name: str, cases: int | None, seconds: float | None, scratch: str) -> None:
    """Inside the worker process: libFuzzer on one target (never returns)."""
    import atheris

    with atheris.instrument_imports(include=["katapy", "fuzz"]):
        from fuzz.common import silence_logs

        one = bounded(load_target(name))
    silence_logs()  # after the imports: it replaces the loggers katapy's modules bound
    crash_dir = CRASHES / name
    crash_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], scratch, str(CORPUS / name), f"-max_len={MAX_LEN}", f"-timeout={int(CASE_TIMEOUT_S) * 3}",
            f"-artifact_prefix={crash_dir}/", "-print_final_stats=1", "-rss_limit_mb=4096"]
    if cases is not None:
        args.append(f"-runs={cases}")
    if seconds is not None:
        args.append(f"-max_total_time={int(seconds)}")
    atheris.Setup(args, one)
    atheris.Fuzz()


def run_atheris(name: str, cases: int | None, seconds: float | None) -> Result:
    res = Result(name)
    cmd = [sys.executable, "-m", "fuzz.run", "--worker", name]
    if cases is not None:
        cmd += ["--cases", str(cases)]
    if seconds is not None:
        cmd += ["--seconds", str(seconds)]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"katapy-fuzz-{name}-") as scratch:
        proc = subprocess.run(cmd + ["--scratch", scratch], cwd=ROOT.parent, capture_output=True, text=True)
    res.seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", out) or re.search(r"Done (\d+) runs", out)
    res.cases = int(m.group(1)) if m else 0
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-40:])
        res.crashes.append(f"worker exited {proc.returncode}:\n{tail}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.splitlines()[0])
    p.add_argument("--target", action="append", choices=TARGETS, help="run only this target (repeatable)")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--seconds", type=float, help="run each target this long")
    bound.add_argument("--cases", type=int, help="run each target for this many cases")
    p.add_argument("--engine", choices=("atheris", "mutate"), default=None,
                   help="atheris (coverage-guided; default when installed) or mutate")
    p.add_argument("--seed", type=int, default=0, help="random seed of the mutation driver")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.cases, a.seconds, a.scratch)
        return 0
    if a.seconds is None and a.cases is None:
        a.seconds = 10.0
    engine = a.engine or ("atheris" if have_atheris() else "mutate")
    print(f"fuzz engine: {engine}", flush=True)
    crashed = False
    for name in a.target or TARGETS:
        if engine == "atheris":
            res = run_atheris(name, a.cases, a.seconds)
        else:
            res = run_mutate(name, a.cases, a.seconds, a.seed)
        print(res.line(), flush=True)
        for c in res.crashes:
            print(c, file=sys.stderr)
        crashed |= bool(res.crashes)
    return 1 if crashed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
