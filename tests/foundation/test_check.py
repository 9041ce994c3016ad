"""`katapy check` tells the truth about this host (issue 2)."""
from __future__ import annotations

import subprocess
import sys

from katapy.vmm.kvm.host import kvm_flavor


def run_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "katapy.cli", "check", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_check_names_the_kvm_flavour_and_its_consequence():
    r = run_check()
    out = r.stdout
    flavor = kvm_flavor()
    if flavor == "kvm-pvm":
        assert "kvm-pvm" in out
        assert "stock Linux guests cannot run on this KVM (kvm-pvm): hypervisor qemu with TCG will be used" in out
    elif flavor.startswith("hardware"):
        assert f"hardware KVM ({flavor})" in out
    else:
        assert "no /dev/kvm" in out
    for name in ("/dev/kvm", "containerd", "cgroups", "guest kernel", "guest image", "hypervisor"):
        assert name in out, f"{name} missing from:\n{out}"


def test_check_reports_a_missing_kernel_by_path(tmp_path):
    cfg = tmp_path / "configuration.toml"
    missing = tmp_path / "no-such-bzImage"
    cfg.write_text(f'[hypervisor]\nname = "qemu"\nkernel = "{missing}"\n')
    import os

    r = run_check(env={**os.environ, "KATAPY_CONFIG": str(cfg)})
    assert r.returncode == 1
    assert str(missing) in r.stdout
    assert "NOT READY" in r.stdout
