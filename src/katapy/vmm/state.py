"""The VMM's externally visible state and why a VM ended."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class VmState(enum.Enum):
    NOT_STARTED = "not-started"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class ExitReason(enum.Enum):
    POWEROFF = "poweroff"  # KVM_SYSTEM_EVENT_SHUTDOWN (ACPI/PSCI-style power off)
    RESET = "reset"  # guest reboot: i8042 reset, KVM_SYSTEM_EVENT_RESET
    TRIPLE_FAULT = "triple-fault"  # KVM_EXIT_SHUTDOWN (also Linux's reboot=t)
    CRASH = "crash"  # KVM_SYSTEM_EVENT_CRASH
    HALTED = "halted"  # every vCPU executed HLT with no in-kernel irqchip to wake it
    STOPPED = "stopped"  # the host asked (Vmm.stop)
    ERROR = "error"  # KVM internal error, failed entry, an ioctl failure


@dataclass(frozen=True)
class VmExit:
    reason: ExitReason
    detail: str = ""
    vcpu: int | None = None
