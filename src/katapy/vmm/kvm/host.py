"""What kind of KVM this host offers.

``kvm_flavor()`` is what ``katapy check`` and ``katapy.hypervisor.select``
use: hardware virtualisation (Intel VMX / AMD SVM, the only kind that runs a
stock Linux guest), kvm-pvm (Pagetable-based Virtual Machine: tiny guest
programs run, a stock Linux guest does not), or no /dev/kvm at all.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

KvmFlavor = Literal["hardware-vmx", "hardware-svm", "kvm-pvm", "absent"]


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def kvm_flavor(
    dev: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> KvmFlavor:
    """Classify this host's KVM (parameters exist so tests can point at fake trees)."""
    if not dev.exists() or not os.access(dev, os.R_OK | os.W_OK):
        return "absent"
    try:
        flags = _cpu_flags(cpuinfo.read_text())
    except OSError:
        flags = set()
    vmx = "vmx" in flags or (sys_module / "kvm_intel").exists()
    svm = "svm" in flags or (sys_module / "kvm_amd").exists()
    vendor_loaded = (sys_module / "kvm_intel").exists() or (sys_module / "kvm_amd").exists()
    if (sys_module / "kvm_pvm").exists() and not vendor_loaded:
        return "kvm-pvm"
    if vmx and "vmx" in flags:
        return "hardware-vmx"
    if svm and "svm" in flags:
        return "hardware-svm"
    if (sys_module / "kvm_pvm").exists():
        return "kvm-pvm"
    # /dev/kvm without a known vendor module or CPU flag: only PVM does that.
    return "kvm-pvm"


def hardware_kvm() -> bool:
    """True when a stock Linux guest can boot here."""
    return kvm_flavor().startswith("hardware")
