"""Backend selection: the rule for each KVM flavour, and the decision on this very host."""
from __future__ import annotations

from pathlib import Path

import pytest

from katapy import config, hypervisor
from katapy.hypervisor.builtin import BuiltinHypervisor
from katapy.hypervisor.qemu import QemuHypervisor
from katapy.hypervisor.selection import decide


@pytest.mark.parametrize(
    "flavor, name, accel",
    [
        ("hardware-vmx", "builtin", "kvm"),
        ("hardware-svm", "builtin", "kvm"),
        ("kvm-pvm", "qemu", "tcg"),
        ("absent", "qemu", "tcg"),
    ],
)
def test_auto_rule(flavor: str, name: str, accel: str) -> None:
    d = decide("auto", flavor=flavor)  # type: ignore[arg-type]
    assert (d.name, d.accel, d.kvm_flavor) == (name, accel, flavor)
    assert flavor in d.reason


def test_forced_names() -> None:
    assert decide("qemu", flavor="kvm-pvm").accel == "tcg"
    d = decide("builtin", flavor="kvm-pvm")
    assert d.name == "builtin" and "will not boot here" in d.reason
    with pytest.raises(ValueError, match="'xen' is not one of auto, builtin, qemu"):
        decide("xen")


def _host_facts() -> str:
    """This host's KVM flavour, read here independently of the code under test."""
    if not Path("/dev/kvm").exists():
        return "absent"
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    mods = {m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if Path("/sys/module", m).exists()}
    if "kvm_pvm" in mods and not mods & {"kvm_intel", "kvm_amd"}:
        return "kvm-pvm"
    if "vmx" in flags:
        return "hardware-vmx"
    if "svm" in flags:
        return "hardware-svm"
    return "kvm-pvm"


def test_decision_on_this_host() -> None:
    facts = _host_facts()
    d = decide("auto")
    assert d.kvm_flavor == facts
    if facts.startswith("hardware"):
        assert (d.name, d.accel) == ("builtin", "kvm")
    else:  # kvm-pvm (this development machine) or no KVM: QEMU with TCG
        assert (d.name, d.accel) == ("qemu", "tcg")


def test_select_builds_the_decided_backend() -> None:
    cfg = config.KatapyConfig()
    hv = hypervisor.select(cfg)
    expected = QemuHypervisor if decide("auto").name == "qemu" else BuiltinHypervisor
    assert type(hv) is expected
    assert type(hypervisor.select(cfg, name="builtin")) is BuiltinHypervisor
    q = hypervisor.select(cfg, name="qemu")
    assert isinstance(q, QemuHypervisor) and q.binary == cfg.hypervisor.path


def test_decide_accepts_a_config() -> None:
    cfg = config.from_dict({"hypervisor": {"name": "qemu"}}, check_files=False)
    assert decide(cfg).name == "qemu"  # type: ignore[arg-type]


def test_vm_config_from_configuration(tmp_path: Path) -> None:
    cfg = config.from_dict(
        {
            "hypervisor": {"default_vcpus": 2, "max_vcpus": 2, "default_memory": 512, "kernel_params": "a=1"},
            "runtime": {"state_dir": str(tmp_path), "log_level": "debug"},
        },
        check_files=False,
    )
    vc = hypervisor.vm_config(cfg, "sb1", shared_dir=tmp_path / "shared", kernel_params="b=2")
    assert vc.state_dir == tmp_path / "sb1"
    assert (vc.vcpus, vc.memory_mib, vc.shared_dir) == (2, 512, tmp_path / "shared")
    assert vc.vsock_path == tmp_path / "sb1" / "vsock.sock"
    cmdline = vc.guest_cmdline()
    assert "katapy.agent_port=1024" in cmdline and "katapy.log=debug" in cmdline
    assert cmdline.endswith("a=1 b=2")  # the user's parameters come last, so they win
    none = config.from_dict({"hypervisor": {"shared_fs": "none"}}, check_files=False)
    assert hypervisor.vm_config(none, "sb2", shared_dir=tmp_path).shared_dir is None
