"""The nested-harness plugin's re-runs: a kvm test that fails in the harness gets up to RERUN_BOOTS more boots,
passes only if one of them passes, and is then named FLAKY with its first failure."""
from __future__ import annotations

import pytest

from katapy.testing import pytest_kvm
from katapy.testing.pytest_kvm import InnerOutcome


@pytest.fixture
def harness(monkeypatch):
    """Scripted outcomes per boot: script[node] is the list of outcomes of its successive boots."""
    calls: list[list[str]] = []
    script: dict[str, list[str]] = {}

    def fake(nodeids):
        calls.append(list(nodeids))
        outcomes = {n: InnerOutcome(script[n].pop(0), f"boom in {n}") for n in nodeids}
        leaks = [f"L1 fault in boot {len(calls)}"] if any(o.outcome == "failed" for o in outcomes.values()) else []
        return outcomes, 10.0, leaks

    monkeypatch.setattr(pytest_kvm, "_harness_pytest", fake)
    saved = dict(pytest_kvm._STATE)
    pytest_kvm._STATE.clear()
    yield script, calls
    pytest_kvm._STATE.clear()
    pytest_kvm._STATE.update(saved)


def run(nodes):
    pytest_kvm._STATE["nodeids"] = nodes
    return pytest_kvm._run_delegated(None)


def test_a_failure_that_passes_on_a_later_boot_is_flaky(harness):
    script, calls = harness
    script.update({"a": ["passed"], "b": ["failed", "failed", "passed"]})
    out = run(["a", "b"])
    assert out["a"].outcome == "passed" and out["b"].outcome == "passed"
    assert calls == [["a", "b"], ["b"], ["b"]]
    assert pytest_kvm._STATE["flaky"] == [("b", "boom in b")]
    assert pytest_kvm._STATE["harness_seconds"] == 30.0
    # what the L1 watch saw in each boot is kept, numbered by boot
    assert pytest_kvm._STATE["l1_faults"] == [(1, "L1 fault in boot 1"), (2, "L1 fault in boot 2")]


def test_a_failure_on_every_boot_stays_a_failure(harness):
    script, calls = harness
    script.update({"b": ["failed"] * (1 + pytest_kvm.RERUN_BOOTS)})
    out = run(["b"])
    assert out["b"].outcome == "failed"
    assert len(calls) == 1 + pytest_kvm.RERUN_BOOTS
    assert pytest_kvm._STATE["flaky"] == []


def test_many_failures_get_no_rerun(harness):
    script, calls = harness
    nodes = [f"t{i}" for i in range(pytest_kvm.RERUN_LIMIT + 1)]
    script.update({n: ["failed"] for n in nodes})
    out = run(nodes)
    assert all(o.outcome == "failed" for o in out.values())
    assert len(calls) == 1


def test_the_summary_prints_the_end_of_a_flaky_tests_first_failure(harness):
    script, _ = harness
    script.update({"b": ["failed", "passed"]})
    run(["b"])
    # the first failure of a boot test ends with the guest console's tail: that is what the summary must keep
    console = [f"[ {i}.0] console line {i}" for i in range(100)]
    pytest_kvm._STATE["flaky"] = [("b", "AssertionError: no readiness line\n" + "\n".join(console))]
    pytest_kvm._STATE["l1_faults"] = [(1, "L1 emulator fault: L2 vCPU 1 exited (npf) at guest RIP 0xffffffff815011bc")]
    pytest_kvm._STATE.update(mode="harness", count=1, words="1 ran in the nested harness")

    class Reporter:
        lines: list[str] = []

        def write_sep(self, sep, text):
            self.lines.append(text)

        def write_line(self, text):
            self.lines.append(text)

    rep = Reporter()
    pytest_kvm.pytest_terminal_summary(rep, 0, None)
    text = "\n".join(rep.lines)
    assert "FLAKY in the nested harness" in text and "b: AssertionError: no readiness line" in text
    assert "console line 99" in text and f"console line {100 - pytest_kvm.FLAKY_TAIL_LINES}" in text
    assert f"console line {99 - pytest_kvm.FLAKY_TAIL_LINES}" not in text
    assert "harness boot 1: L1 emulator fault: L2 vCPU 1 exited (npf) at guest RIP 0xffffffff815011bc" in text


def test_a_lost_boot_is_replaced_by_a_fresh_one(harness):
    """An L1 VM that dies mid-run gives no results for any test: the whole set runs again in a fresh L1
    (once), the lost boot is named in the summary, and the replacement counts as the first run."""
    script, calls = harness
    nodes = [f"t{i}" for i in range(pytest_kvm.RERUN_LIMIT + 3)]
    script.update({n: [pytest_kvm.LOST, "passed"] for n in nodes})
    script["t0"] = [pytest_kvm.LOST, "failed", "passed"]
    out = run(nodes)
    assert all(o.outcome == "passed" for o in out.values())
    assert calls == [nodes, nodes, ["t0"]]
    assert [n for n, _ in pytest_kvm._STATE["flaky"]] == ["t0"]  # only the re-run after the replacement
    assert any(boot == 1 and "boot lost" in what for boot, what in pytest_kvm._STATE["l1_faults"])


def test_boots_lost_again_and_again_fail_their_tests(harness):
    script, calls = harness
    script.update({"a": [pytest_kvm.LOST] * 5})
    out = run(["a"])
    assert out["a"].outcome == pytest_kvm.LOST
    assert len(calls) == 1 + pytest_kvm.LOST_BOOT_RETRIES + pytest_kvm.RERUN_BOOTS
