"""Which backend runs a sandbox on this host, and why.

``auto`` follows Kata 4.0's default (the built-in VMM) wherever hardware KVM
is there to run a Linux guest.  On a host whose /dev/kvm is kvm-pvm (a
paravirtual KVM that runs small programs but not a stock Linux guest; see
docs/testing.md) or that has no /dev/kvm at all, ``auto``
picks QEMU with TCG, the only accelerator that boots the guest there.

The KVM flavour comes from ``katapy.vmm.kvm.host.kvm_flavor()`` (``/proc/cpuinfo``
flags vmx/svm, ``/sys/module/{kvm_pvm,kvm_intel,kvm_amd}``, ``/dev/kvm``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from katapy import log

_log = log.get("hypervisor.selection")

Flavor = Literal["hardware-vmx", "hardware-svm", "kvm-pvm", "absent"]
BACKENDS = ("builtin", "qemu")
CHOICES = ("auto", *BACKENDS)


@dataclass(frozen=True)
class Decision:
    """The backend chosen, with the accelerator it will use and the reason in words."""

    name: Literal["builtin", "qemu"]
    accel: Literal["kvm", "tcg"]
    reason: str
    kvm_flavor: Flavor


def kvm_flavor() -> Flavor:
    """The host's KVM flavour, from the VMM package's probe (``katapy.vmm.kvm.host``)."""
    try:
        from katapy.vmm.kvm.host import kvm_flavor as vmm_probe
    except ImportError:  # the VMM package is not there: only the coarse facts
        if not Path("/dev/kvm").exists():
            return "absent"
        return "kvm-pvm" if Path("/sys/module/kvm_pvm").exists() else "hardware-vmx"
    return vmm_probe()


def kvm_usable() -> bool:
    """/dev/kvm exists and this process may open it read-write."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def decide(name: str = "auto", flavor: Flavor | None = None) -> Decision:
    """Resolve a configured hypervisor name (``auto`` | ``builtin`` | ``qemu``) on this host.

    ``name`` may also be a :class:`katapy.config.KatapyConfig` (its
    ``hypervisor.name`` is used), which is what ``katapy check`` passes.
    """
    hv = getattr(name, "hypervisor", None)
    if hv is not None:
        name = hv.name
    if name not in CHOICES:
        raise ValueError(f"hypervisor name {name!r} is not one of {', '.join(CHOICES)}")
    flavor = flavor if flavor is not None else kvm_flavor()
    hardware = flavor in ("hardware-vmx", "hardware-svm")
    if name == "builtin":
        reason = f"configured: builtin (host KVM: {flavor})"
        if not hardware:
            reason += "; a Linux guest needs hardware KVM, so the VM will not boot here"
        decision = Decision("builtin", "kvm", reason, flavor)
    elif name == "qemu":
        accel: Literal["kvm", "tcg"] = "kvm" if hardware and kvm_usable() else "tcg"
        why = "hardware KVM" if accel == "kvm" else f"no hardware KVM ({flavor})"
        decision = Decision("qemu", accel, f"configured: qemu, accel {accel} because {why}", flavor)
    elif hardware:
        decision = Decision("builtin", "kvm", f"auto: hardware KVM ({flavor}) runs the built-in VMM", flavor)
    elif flavor == "kvm-pvm":
        decision = Decision(
            "qemu", "tcg", "auto: /dev/kvm is kvm-pvm, which cannot run a Linux guest; using QEMU with TCG", flavor
        )
    else:
        decision = Decision("qemu", "tcg", f"auto: no usable /dev/kvm ({flavor}); using QEMU with TCG", flavor)
    _log.debug("hypervisor decided", backend=decision.name, accel=decision.accel, reason=decision.reason)
    return decision
