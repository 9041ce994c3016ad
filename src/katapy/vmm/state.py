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


@dataclass(frozen=True)
class QueueCounts:
    """One virtqueue's counters at one instant (``Vmm.virtio_counts``); all only grow while the device is
    plugged, across driver resets.

    ``requests``: descriptor chains the device completed (returned on the used ring), malformed ones
    included; ``read_bytes``: the device-readable bytes of those chains (what the driver sent);
    ``written_bytes``: the lengths the device reported written into the driver's buffers.
    """

    device: str  # "virtio-blk-0": the device type and its number among the VM's devices of that type
    queue: int
    requests: int
    read_bytes: int
    written_bytes: int
