"""The fuzz harnesses' fast form: every corpus input replayed, then a short mutation run per target.

``make fuzz`` runs the coverage-guided long form (fuzz/run.py); this keeps
every crasher found so far fixed and every harness working, in well under
90 s on a 2-core host.
"""
from __future__ import annotations

import pytest

from fuzz.common import quiet_logs
from fuzz.run import CORPUS, bounded, load_target, run_mutate
from fuzz.targets import TARGETS

SECONDS_PER_TARGET = 3.0


def _corpus_files():
    for name in TARGETS:
        for p in sorted((CORPUS / name).iterdir()):
            yield pytest.param(name, p, id=f"{name}/{p.name}")


def test_every_target_has_a_corpus():
    for name in TARGETS:
        assert any((CORPUS / name).iterdir()), f"fuzz/corpus/{name} is empty"


@pytest.mark.parametrize("name,path", list(_corpus_files()))
def test_corpus_input_runs_clean(name, path):
    one = bounded(load_target(name))
    with quiet_logs():
        one(path.read_bytes())


@pytest.mark.parametrize("name", TARGETS)
def test_short_mutation_run_finds_no_crash(name):
    res = run_mutate(name, cases=None, seconds=SECONDS_PER_TARGET, seed=1)
    assert res.cases > 0
    assert not res.crashes, "\n".join(res.crashes)
