"""Typed vCPU exits: what ``KVM_RUN`` came back for, instead of a raw ``struct kvm_run``.

Documentation/virt/kvm/api.rst, section 5 ("The kvm_run structure").  An exit
that needs an answer (port input, MMIO read) is completed through
:meth:`katapy.vmm.kvm.vcpu.VcpuFd.complete_io_in` /
:meth:`~katapy.vmm.kvm.vcpu.VcpuFd.complete_mmio_read` before the next run.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IoIn:
    """KVM_EXIT_IO, direction in: the guest reads ``size`` bytes from ``port`` (``count`` times for ins)."""

    port: int
    size: int
    count: int = 1


@dataclass(frozen=True)
class IoOut:
    """KVM_EXIT_IO, direction out: ``data`` holds ``count`` items of ``size`` bytes."""

    port: int
    size: int
    data: bytes
    count: int = 1


@dataclass(frozen=True)
class MmioRead:
    """KVM_EXIT_MMIO, is_write=0: the guest loads ``length`` bytes from ``addr``."""

    addr: int
    length: int


@dataclass(frozen=True)
class MmioWrite:
    """KVM_EXIT_MMIO, is_write=1: the guest stored ``data`` at ``addr``."""

    addr: int
    data: bytes


@dataclass(frozen=True)
class Hlt:
    """KVM_EXIT_HLT: the guest halted (only without an in-kernel LAPIC)."""


@dataclass(frozen=True)
class Shutdown:
    """KVM_EXIT_SHUTDOWN: triple fault (or a shutdown cycle); the VM cannot go on."""


@dataclass(frozen=True)
class SystemEvent:
    """KVM_EXIT_SYSTEM_EVENT: ``kind`` is KVM_SYSTEM_EVENT_SHUTDOWN/RESET/CRASH."""

    kind: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True)
class IoapicEoi:
    """KVM_EXIT_IOAPIC_EOI (split irqchip only): the guest ended a level-triggered IOAPIC interrupt."""

    vector: int


@dataclass(frozen=True)
class InternalError:
    """KVM_EXIT_INTERNAL_ERROR: KVM could not emulate something (suberror 1 = emulation failure)."""

    suberror: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True)
class FailEntry:
    """KVM_EXIT_FAIL_ENTRY: VM entry failed (bad register state); ``reason`` is hardware specific."""

    reason: int
    cpu: int


@dataclass(frozen=True)
class Interrupted:
    """KVM_RUN returned EINTR (a kick signal or immediate_exit): no guest event."""


@dataclass(frozen=True)
class Unknown:
    """Any other exit reason, with KVM's number for it."""

    reason: int
    hardware_reason: int = 0


VcpuExit = (
    IoIn | IoOut | MmioRead | MmioWrite | Hlt | Shutdown | SystemEvent | IoapicEoi | InternalError | FailEntry
    | Interrupted | Unknown
)
