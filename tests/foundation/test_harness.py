"""The nested KVM harness gives hardware-style KVM where the host has kvm-pvm (issue 2)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from katapy.testing import harness
from katapy.vmm.kvm.host import kvm_flavor


def test_raw_kvm_smoke_on_this_host_names_its_flavor():
    r = subprocess.run([sys.executable, "-m", "katapy.testing.kvm_smoke"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"kvm-smoke: ok flavor={kvm_flavor()} exits=IoOut(port=0x10,data=4b),Hlt" in r.stdout


@pytest.mark.slow
def test_inside_the_harness_kvm_is_hardware_svm_and_runs_the_smoke_program():
    ok, why = harness.available()
    if not ok:
        pytest.skip(why)
    py = sys.executable
    r = harness.run_in_kvm_vm(f"{py} -m katapy.cli check; {py} -m katapy.testing.kvm_smoke", timeout=400)
    assert not r.timed_out, r.console[-3000:]
    assert "hardware KVM (hardware-svm)" in r.output, r.output
    assert "kvm-smoke: ok flavor=hardware-svm exits=IoOut(port=0x10,data=4b),Hlt" in r.output, r.output
    assert r.returncode == 0, r.output


@pytest.mark.slow
def test_harness_reports_the_exit_status():
    ok, why = harness.available()
    if not ok:
        pytest.skip(why)
    r = harness.run_in_kvm_vm("echo marker-$((6*7)); echo data > /run/katapy-harness/out.txt; exit 3", timeout=300)
    assert "marker-42" in r.output
    assert r.returncode == 3
    assert r.files["out.txt"] == b"data\n"
    # the L1 watch (katapy.testing.l1_watch) is armed, and with no L2 guest it catches nothing
    assert "harness: l1-watch on" in r.console, r.console[-3000:]
    assert r.l1_caught == [] and "l1-trace.txt" not in r.files


@pytest.mark.slow
def test_harness_kills_the_vm_on_timeout():
    ok, why = harness.available()
    if not ok:
        pytest.skip(why)
    r = harness.run_in_kvm_vm("sleep 600", timeout=20)
    assert r.timed_out and r.returncode == -1
    import os

    assert not os.path.exists(f"/proc/{r.qemu_pid}"), f"harness QEMU {r.qemu_pid} left running"
