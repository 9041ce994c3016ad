"""pytest plugin: tests marked ``kvm`` run where /dev/kvm is hardware-style KVM.

* On a host with hardware KVM (vmx/svm), or inside the harness's L1 VM
  (``KATAPY_IN_HARNESS=1``), they run directly.
* Elsewhere (kvm-pvm, or no /dev/kvm) they are delegated: the first one to run
  boots the nested KVM harness once and runs every collected ``kvm`` test in
  it (``python -m pytest <node ids>`` inside the L1 VM, results as JUnit XML
  in the harness's scratch directory); each test here then reports the
  outcome it had there, its failure text included.
* Without QEMU or the harness kernel they are skipped, saying which is missing.

The terminal summary states which case ran, so a report never leaves it open.
"""
from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest

_STATE: dict[str, object] = {}


@dataclass
class InnerOutcome:
    outcome: str  # passed | failed | skipped | error | missing
    message: str


def _mode() -> tuple[str, str]:
    """('direct' | 'harness' | 'unavailable', words)."""
    if os.environ.get("KATAPY_IN_HARNESS") == "1":
        return "direct", "inside the nested KVM harness (L1 VM under QEMU TCG, kvm_amd)"
    from katapy.vmm.kvm.host import kvm_flavor

    flavor = kvm_flavor()
    if flavor.startswith("hardware"):
        return "direct", f"directly on this host's hardware KVM ({flavor})"
    from katapy.testing import harness

    ok, why = harness.available()
    if ok:
        return "harness", f"delegated to the nested KVM harness (host KVM is {flavor})"
    return "unavailable", f"host KVM is {flavor} and the nested KVM harness cannot run: {why}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs hardware-style KVM (runs in the nested harness elsewhere)")


class HarnessItem(pytest.Item):
    """Stands for a ``kvm`` test that runs inside the harness VM."""

    def __init__(self, *, original_nodeid: str, **kw):
        super().__init__(**kw)
        self.original_nodeid = original_nodeid

    def runtest(self) -> None:
        results = _run_delegated(self.session)
        r = results.get(self.original_nodeid, InnerOutcome("missing", "the harness run reported nothing for it"))
        if r.outcome == "passed":
            return
        if r.outcome == "skipped":
            pytest.skip(f"[in nested KVM harness] {r.message}")
        pytest.fail(f"[in nested KVM harness] {r.outcome}:\n{r.message}", pytrace=False)

    def reportinfo(self):
        return self.path, None, f"{self.original_nodeid} [nested KVM harness]"


@pytest.hookimpl(trylast=True)  # after pytest orders items by fixture scope: the harness items stay first
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    kvm_items = [i for i in items if i.get_closest_marker("kvm")]
    if not kvm_items:
        return
    mode, words = _mode()
    _STATE["mode"], _STATE["words"], _STATE["count"] = mode, words, len(kvm_items)
    if mode == "direct":
        return
    if mode == "unavailable":
        for i in kvm_items:
            i.add_marker(pytest.mark.skip(reason=words))
        return
    _STATE["nodeids"] = [i.nodeid for i in kvm_items]
    for idx, i in enumerate(items):
        if i in kvm_items:
            new = HarnessItem.from_parent(i.parent, name=i.name, original_nodeid=i.nodeid)
            new.own_markers.extend(i.iter_markers())  # Mark objects (add_marker wants decorators)
            # the first delegated item waits for the whole harness run: pytest-timeout's per-test
            # limit must not cut it short (a cut-short run is redone by the next item)
            new.add_marker(pytest.mark.timeout((1 + LOST_BOOT_RETRIES + RERUN_BOOTS) * _harness_timeout() + 240))  # a run and re-runs
            items[idx] = new
    # The harness boots first, while the host runs nothing else of the suite: no module's QEMU guest,
    # containerd or shim is alive beside it on a two-core host. (With those alive, QEMU TCG's nested SVM
    # corrupted the L1's memory ~500 s into the boot in two CI runs; alone, the same set passed.)
    items[:] = [i for i in items if isinstance(i, HarnessItem)] + [i for i in items if not isinstance(i, HarnessItem)]


def _harness_timeout() -> float:
    return float(os.environ.get("KATAPY_HARNESS_TIMEOUT", "2700"))


def _harness_pytest(nodeids: list[str]) -> tuple[dict[str, InnerOutcome], float, list[str]]:
    """One boot of the harness running ``nodeids`` with pytest: their outcomes there, the run's seconds, and
    what the harness's L1 watch caught in that boot (katapy.testing.l1_watch), described."""
    from katapy import paths
    from katapy.testing.harness import run_in_kvm_vm

    py = os.path.relpath(sys.executable, paths.REPO_ROOT) if sys.executable.startswith(str(paths.REPO_ROOT)) else sys.executable
    args = " ".join(f"'{n}'" for n in nodeids)
    # -v: each test's node id reaches the console as it starts, so a lost boot names the test it died in
    cmd = f"{py} -m pytest -p no:cacheprovider -v -rA --junitxml=/run/katapy-harness/junit.xml {args}"
    result = run_in_kvm_vm(cmd, timeout=_harness_timeout())
    outcomes: dict[str, InnerOutcome] = {}
    junit = result.files.get("junit.xml")
    if junit:
        outcomes = _parse_junit(junit.decode(errors="replace"), nodeids)
    if not outcomes:
        lines = result.output.splitlines()
        tail = "\n".join(lines[-60:])
        started = [ln.split()[0] for ln in lines if ln.startswith("tests/") and "::" in ln]
        where = f"; the last test it started: {started[-1]} ({len(started)} started)" if started else ""
        for n in nodeids:
            outcomes[n] = InnerOutcome(LOST, f"the harness run gave no results (exit {result.returncode}, "
                                             f"{result.seconds:.0f} s{where}):\n{tail}")
    return outcomes, result.seconds, [c.describe() for c in result.l1_caught]


#: the outcome of every test of a harness boot that gave no results (the L1 VM itself died or timed out)
LOST = "lost"
#: replacement boots for a lost one: the emulator can reset the L1 itself, whatever the tests do
LOST_BOOT_RETRIES = 1
#: more harness boots for the tests that failed in the first, when no more than this many did
RERUN_LIMIT = 8
#: how many more boots a failing test gets (each one is named FLAKY in the summary if it then passes)
RERUN_BOOTS = 2
#: lines of a FLAKY test's first failure printed in the summary (its end: the guest console's tail, for a boot)
FLAKY_TAIL_LINES = 40


def _run_delegated(session: pytest.Session) -> dict[str, InnerOutcome]:
    if "results" in _STATE:
        return _STATE["results"]  # type: ignore[return-value]
    nodeids: list[str] = _STATE["nodeids"]  # type: ignore[assignment]
    outcomes, seconds, caught = _harness_pytest(nodeids)
    l1_faults = [(1, c) for c in caught]  # (harness boot, what the L1 watch saw)
    boot = 1
    for _ in range(LOST_BOOT_RETRIES):
        if not all(o.outcome == LOST for o in outcomes.values()):
            break
        # The L1 VM died before pytest inside it reported anything (QEMU TCG has reset it mid-run):
        # say so, and run the whole set again in a fresh L1 as if that boot had been the first.
        boot += 1
        lost = next(iter(outcomes.values())).message.splitlines()
        l1_faults.append((boot - 1, f"boot lost, all its tests run again in boot {boot}: {' / '.join(lost[:1] + lost[-1:])}"))
        outcomes, more, caught = _harness_pytest(nodeids)
        l1_faults += [(boot, c) for c in caught]
        seconds += more
    first_failure = {n: o.message for n, o in outcomes.items()}
    flaky: list[tuple[str, str]] = []  # (nodeid, its first failure)
    for boot in range(boot + 1, boot + RERUN_BOOTS + 1):
        failed = [n for n in nodeids
                  if outcomes.get(n, InnerOutcome("missing", "")).outcome in ("failed", "error", "missing", LOST)]
        if not failed or len(failed) > RERUN_LIMIT:
            break
        # QEMU TCG's nested SVM now and then resumes an L2 vCPU with the L1's own state, and that L2 guest
        # triple-faults (katapy.testing.l1_watch reports what it sees of it): a failure gets another harness
        # boot, and every test that needed one is named in the summary with its first failure.
        again, more, caught = _harness_pytest(failed)
        l1_faults += [(boot, c) for c in caught]
        seconds += more
        for n in failed:
            if again.get(n) is not None and again[n].outcome == "passed":
                flaky.append((n, first_failure.get(n, "missing").strip() or "?"))
            if n in again:
                outcomes[n] = again[n]
    _STATE["harness_seconds"] = seconds
    _STATE["flaky"] = flaky
    _STATE["l1_faults"] = l1_faults
    _STATE["results"] = outcomes
    return outcomes


def _parse_junit(text: str, nodeids: list[str]) -> dict[str, InnerOutcome]:
    root = ET.fromstring(text)
    by_key: dict[tuple[str, str], InnerOutcome] = {}
    for tc in root.iter("testcase"):
        key = (tc.get("classname", ""), tc.get("name", ""))
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (el.get("message") or "") + ("\n" + el.text if el.text and tag != "skipped" else "")
                break
        by_key[key] = InnerOutcome(outcome, msg.strip())
    out: dict[str, InnerOutcome] = {}
    for n in nodeids:
        path, _, name = n.partition("::")
        cls_parts = name.split("::")
        func = cls_parts[-1]
        classname = path[:-3].replace("/", ".") + ("." + ".".join(cls_parts[:-1]) if len(cls_parts) > 1 else "")
        if (classname, func) in by_key:
            out[n] = by_key[(classname, func)]
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if "mode" not in _STATE:
        return
    line = f"kvm-marked tests ({_STATE['count']}): {_STATE['words']}"
    if "harness_seconds" in _STATE:
        line += f"; harness run took {_STATE['harness_seconds']:.0f} s"
    terminalreporter.write_sep("-", line)
    for boot, fault in _STATE.get("l1_faults", []):  # type: ignore[attr-defined]
        terminalreporter.write_line(f"harness boot {boot}: {fault}")
    for nodeid, failure in _STATE.get("flaky", []):  # type: ignore[attr-defined]
        lines = failure.splitlines()
        terminalreporter.write_line(
            f"FLAKY in the nested harness (failed, then passed on a later harness boot): {nodeid}: {lines[0][:300]}")
        if len(lines) > 1:  # the end of the first failure: for a guest boot, the console's last lines
            terminalreporter.write_line(f"  first failure, last {FLAKY_TAIL_LINES} lines:")
            for line in lines[1:][-FLAKY_TAIL_LINES:]:
                terminalreporter.write_line(f"  | {line[:300]}")
