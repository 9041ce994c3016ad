"""Soak and leak accounting (issue 19): many sandboxes, pods and execs in a row, and a census of what the host
and containerd hold after each round, which must not grow.

The CI form runs a few of each (under ~3 min on a 2-core TCG host); ``make soak`` runs the long form:
``KATAPY_SOAK_RUNS=200 KATAPY_SOAK_PODS=10 KATAPY_SOAK_ROUNDS=5 KATAPY_SOAK_EXECS=100``.  Bounds:
containerd's fds do not grow after the first round, its threads grow by <= 16 (Go keeps the OS
threads its scheduler started) and its RSS grows < 10 MiB in all; the shim's own memory (RssAnon:
its VmRSS also counts the guest RAM it maps for its vhost-user back ends) grows < 4 MiB over the
execs after a warm-up of 5 and its fd count stays flat; every other count of ``census.STRICT`` does
not grow at all.

Reproduce: ``.venv/bin/python -m pytest -v -s tests/soak``.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults.helpers import BOOT_TIMEOUT, RUNTIME, remove
from tests.shim.containerd import IMAGE, PrivateContainerd, shim_pids

from .census import Census, fd_count, grown, private_kib, take

pytestmark = [pytest.mark.containerd, pytest.mark.guest, pytest.mark.slow]

RUNS = int(os.environ.get("KATAPY_SOAK_RUNS", "5"))
PODS = int(os.environ.get("KATAPY_SOAK_PODS", "2"))
ROUNDS = int(os.environ.get("KATAPY_SOAK_ROUNDS", "1"))
EXECS = int(os.environ.get("KATAPY_SOAK_EXECS", "20"))
RUN_ROUNDS = 5  # the sequential runs are censused in this many rounds
CONTAINERD_RSS_BOUND_KIB = 10 * 1024
THREAD_BOUND = 16  # Go keeps the OS threads its scheduler started (9 -> 14 with 4 parallel pods here)
SHIM_RSS_BOUND_KIB = 4 * 1024
EXEC_WARMUP = 5
SETTLE_S = 20.0  # containerd does not wait for a shim to exit after Shutdown: give what is ending time to end
# the suite's 600 s per test is too short for the long form: a budget per run, pod and exec on top
BASE_TIMEOUT_S = 600


def _settled(c, baseline: Census) -> Census:
    """A census once nothing of ``census.STRICT`` is above ``baseline``, or after ``SETTLE_S``."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = take(c)
        if not grown(baseline, now) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def _report(name: str, census: list[Census], started: float) -> None:
    print(f"\n{name} ({time.monotonic() - started:.0f} s):")
    for i, s in enumerate(census):
        print(f"  {'before' if i == 0 else f'round {i}'}: {s.line()}")


def _assert_flat(census: list[Census]) -> None:
    base = census[0]
    for i, s in enumerate(census[1:], 1):
        assert not grown(base, s), f"round {i} grew: {grown(base, s)}"
        assert s.containerd_fds <= census[1].containerd_fds, f"containerd fds grew after round 1 (round {i})"
        assert s.containerd_threads - base.containerd_threads <= THREAD_BOUND, f"containerd threads (round {i})"
    rss = census[-1].containerd_rss_kib - base.containerd_rss_kib
    assert rss < CONTAINERD_RSS_BOUND_KIB, f"containerd RSS grew {rss} KiB"


@pytest.mark.timeout(BASE_TIMEOUT_S + 60 * RUNS)
def test_sequential_ctr_runs_leave_nothing(containerd: PrivateContainerd) -> None:
    c, started = containerd, time.monotonic()
    census = [take(c)]
    per_round = -(-RUNS // RUN_ROUNDS)
    try:
        for first in range(0, RUNS, per_round):
            for i in range(first, min(first + per_round, RUNS)):
                res = c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, f"ks-run-{i}", "true", check=False,
                            timeout=BOOT_TIMEOUT)
                assert res.returncode == 0, f"run {i}: {res.stdout}{res.stderr}"
            census.append(_settled(c, census[0]))
    finally:
        _report(f"{RUNS} sequential ctr runs", census, started)
        c.remove_containers()
    _assert_flat(census)


def _pod(cl, name: str) -> str:
    config = cl.pod_config(name, dns=["10.96.0.10"])
    pod_id = cl.run_pod(config, "katapy")
    for n in ("a", "b"):
        cl.start_container(cl.create_container(pod_id, config, f"{name}-{n}", ["sleep", "3600"]))
    return pod_id


def _unpod(cl, pod_id: str) -> None:
    cl.stop_pod(pod_id)
    cl.remove_pod(pod_id)


@pytest.mark.timeout(BASE_TIMEOUT_S + 120 * PODS * ROUNDS)
def test_parallel_cri_pods_rounds_leave_nothing(cri_containerd) -> None:
    c, started = cri_containerd, time.monotonic()
    census = [take(c)]
    try:
        with ThreadPoolExecutor(max_workers=PODS) as pool:
            for r in range(ROUNDS):
                pods = list(pool.map(lambda i: _pod(c.client, f"ks-{r}-{i}"), range(PODS)))
                assert len(c.client.list_containers()) == 2 * PODS
                list(pool.map(lambda p: _unpod(c.client, p), pods))
                census.append(_settled(c, census[0]))
    finally:
        _report(f"{ROUNDS} rounds of {PODS} parallel CRI pods", census, started)
        c.remove_all_pods()
    _assert_flat(census)


@pytest.mark.timeout(BASE_TIMEOUT_S + 10 * EXECS)
def test_many_execs_keep_the_shim_flat(containerd: PrivateContainerd) -> None:
    c, cid, started = containerd, "ks-exec", time.monotonic()
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "3600", timeout=BOOT_TIMEOUT)
    try:
        (shim,) = shim_pids(c.katapy_state)
        samples = []
        for i in range(EXECS):
            res = c.ctr("task", "exec", "--exec-id", f"e{i}", cid, "true", check=False)
            assert res.returncode == 0, f"exec {i}: {res.stdout}{res.stderr}"
            if i + 1 in (EXEC_WARMUP, EXECS):
                samples.append((i + 1, *private_kib(shim), fd_count(shim)))
    finally:
        remove(c, cid)
    print(f"\n{EXECS} execs ({time.monotonic() - started:.0f} s): shim (exec n, RssAnon KiB, RssShmem KiB = guest RAM "
          f"it maps, fds): {samples}")
    (_, rss0, _, fds0), (_, rss1, _, fds1) = samples[0], samples[-1]
    assert rss1 - rss0 < SHIM_RSS_BOUND_KIB, f"shim RssAnon grew {rss1 - rss0} KiB over {EXECS - EXEC_WARMUP} execs"
    assert fds1 <= fds0, f"shim fds grew from {fds0} to {fds1}"
