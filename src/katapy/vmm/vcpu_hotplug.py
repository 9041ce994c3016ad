"""vCPU hotplug on the built-in VMM: KVM vCPUs created and their threads started or stopped on a running VM.

The VM boots with ``vcpus`` KVM vCPUs; its MP table and every vCPU's CPUID
describe ``max_vcpus`` CPUs (APIC id ``i`` for CPU ``i``), so the guest's
present mask covers them all and ``maxcpus=<vcpus>`` keeps the others
offline (Documentation/admin-guide/kernel-parameters.txt, ``maxcpus=``).
The guest is told through the upcall channel (``katapy.vmm.upcall``, ADD_CPU /
DEL_CPU, dbs-upcall's device-manager service); katapy's guest agent writes
``/sys/devices/system/cpu/cpuN/online`` (Documentation/core-api/cpu_hotplug.rst),
and the kernel brings CPU ``N`` up with INIT-SIPI-SIPI to APIC id ``N``, which
KVM delivers to the vCPU with that id (api.rst 4.7 KVM_CREATE_VCPU: on x86
the vCPU id is the APIC id).  vCPUs 0..count-1 always have a running thread;
CPU 0 (the boot processor) never goes.

Ordering keeps host and guest consistent, as memory hotplug does
(``katapy.vmm.memory_hotplug``):

* grow: KVM_CREATE_VCPU + the boot-time per-vCPU setup (CPUID, MSRs, LAPIC;
  an AP under the in-kernel LAPIC waits for INIT-SIPI in KVM_RUN) and a
  started thread first (the guest can only online a CPU that answers its
  SIPI), then ADD_CPU.  A refusal (the guest answered an errno; its server
  undid what it changed) or a request that never left stops the new threads.
  A timeout or a lost channel keeps them: the guest may have onlined them, and
  a CPU without a thread would hang the guest in its IPIs.
* shrink: DEL_CPU first (the guest offlines: the CPU ends halted in the
  kernel's ``play_dead``), then the threads stop.  A refusal or a lost answer
  keeps them.

KVM cannot destroy a vCPU (api.rst 4.7 has no KVM_DESTROY_VCPU; a vCPU lives as
long as its VM, and creating the same id twice fails with EEXIST).  So a
removed vCPU is *parked*: its thread stops, its fd stays open (closed with the
VM), and the next grow starts a new thread on it; the guest's INIT-SIPI-SIPI
resets it (``kvm_apic_accept_events``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from katapy import log

_log = log.get("vmm.vcpu_hotplug")


class VcpuHotplugError(RuntimeError):
    """A resize that cannot be done; the message says why and how many vCPUs the VM has."""


class CpuUpcall(Protocol):
    """The two device-manager requests vCPU hotplug needs (``katapy.vmm.upcall.DeviceManagerClient``)."""

    def add_cpus(self, apic_ids: list[int]) -> None: ...

    def del_cpus(self, apic_ids: list[int]) -> None: ...


@dataclass(frozen=True)
class VcpuOps:
    """What the VMM does for one vCPU (``katapy.vmm.api.Vmm`` gives its own; tests fake them)."""

    #: KVM_CREATE_VCPU with id ``index`` and its per-vCPU setup; called once per index
    create: Callable[[int], None]
    #: start a thread running vCPU ``index`` (created earlier; a parked one is re-armed first)
    start: Callable[[int], None]
    #: stop and join vCPU ``index``'s thread, its fd stays; raises if the thread would not stop
    stop: Callable[[int], None]


def _refused(exc: BaseException) -> bool:
    """True when the guest did not change anything: it answered with an errno, or the request never left
    (``UpcallError.sent`` is False), or the arguments were refused before sending (ValueError)."""
    from katapy.vmm.upcall import UpcallError, UpcallRefused

    return isinstance(exc, (UpcallRefused, ValueError)) or (isinstance(exc, UpcallError) and not exc.sent)


class VcpuHotplug:
    """The vCPUs of one VM: ``resize(n)`` makes vCPUs 0..n-1 run, the guest onlining the new ones."""

    def __init__(self, boot_count: int, max_count: int, ops: VcpuOps, upcall: CpuUpcall) -> None:
        if not 1 <= boot_count <= max_count:
            raise VcpuHotplugError(f"vCPU hotplug needs 1 <= boot vCPUs ({boot_count}) <= max_vcpus ({max_count})")
        self.max_count = max_count
        self.ops = ops
        self.upcall = upcall
        self.count = boot_count  # vCPUs 0..count-1 have a running thread
        self.created = set(range(boot_count))  # KVM vCPUs that exist (running or parked)
        self._lock = threading.Lock()

    @property
    def parked(self) -> list[int]:
        """vCPUs KVM has but no thread runs (removed earlier, or a grow undone)."""
        return sorted(i for i in self.created if i >= self.count)

    def resize(self, n: int) -> int:
        """Make the VM's vCPUs 0..n-1 (1..max_count); returns the count it has after."""
        if not 1 <= n <= self.max_count:
            raise VcpuHotplugError(f"{n} vCPUs is outside 1..{self.max_count} (max_vcpus)")
        with self._lock:
            if n > self.count:
                self._grow(n)
            elif n < self.count:
                self._shrink(n)
            return self.count

    def _grow(self, n: int) -> None:
        ids = list(range(self.count, n))
        started: list[int] = []
        try:
            for i in ids:
                if i not in self.created:
                    self.ops.create(i)
                    self.created.add(i)
                self.ops.start(i)
                started.append(i)
        except Exception as exc:
            self._stop(started)
            raise VcpuHotplugError(f"adding vCPUs {ids}: {exc}; the VM keeps {self.count} vCPUs") from exc
        try:
            self.upcall.add_cpus(ids)
        except Exception as exc:
            if _refused(exc):
                self._stop(started)
                raise VcpuHotplugError(f"the guest refused or never got ADD_CPU {ids}: {exc}; their threads "
                                       f"were stopped, the VM keeps {self.count} vCPUs") from exc
            self.count = n  # in doubt: the guest may have onlined them, so their threads stay
            raise VcpuHotplugError(f"adding vCPUs {ids}: no answer from the guest ({exc}); they stay, the VM "
                                   f"has {self.count} vCPUs") from exc
        self.count = n
        _log.info("vCPUs added", ids=ids, vcpus=self.count)

    def _shrink(self, n: int) -> None:
        ids = list(range(n, self.count))
        try:
            self.upcall.del_cpus(ids)
        except Exception as exc:
            raise VcpuHotplugError(f"removing vCPUs {ids}: {exc}; they stay, the VM keeps {self.count} "
                                   f"vCPUs") from exc
        self.count = n  # the guest has them offline from here on
        failed = self._stop(ids)
        if failed:
            raise VcpuHotplugError(f"the guest offlined vCPUs {ids}, but the threads of {failed} did not stop; "
                                   f"the VM has {self.count} vCPUs")
        _log.info("vCPUs removed", ids=ids, vcpus=self.count)

    def _stop(self, ids: list[int]) -> list[int]:
        """Park ``ids`` (highest first); the ids whose thread would not stop."""
        failed = []
        for i in reversed(ids):
            try:
                self.ops.stop(i)
            except Exception as exc:
                _log.error("vCPU thread did not stop", vcpu=i, error=str(exc))
                failed.append(i)
        return sorted(failed)
