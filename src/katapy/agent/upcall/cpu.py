"""ADD_CPU / DEL_CPU: bring the vCPUs the VMM hot-added into use, or take them out of use, through sysfs.

Kernel ABI: Documentation/core-api/cpu_hotplug.rst and
Documentation/ABI/stable/sysfs-devices-system-cpu, read through
:class:`katapy.agent.cpu_online.CpuSysfs`: ``present`` lists the CPUs,
``cpu<N>/online`` reads ``1``/``0`` and takes a write of ``1`` (bring up) or
``0`` (take down); a CPU without the file (CPU 0 on x86) cannot go offline.

The request names CPUs by APIC id (dbs-upcall ``{u8 count, u8 apic_ver, u8
apic_ids[]}``).  In katapy's VMM the MP table lists CPU ``i`` with APIC id
``i`` and Linux numbers CPUs in MP-table order, so APIC id == Linux CPU
number.  A CPU already in the wanted state is done.  The first CPU that
fails ends the request: the CPUs this request changed go back, and the
reply carries ``-errno`` and that CPU's index in ``apic_ids``
(dbs-upcall's ``apic_index``).
"""
from __future__ import annotations

import errno

from katapy.agent import log
from katapy.agent.cpu_online import SYS_CPU, CpuSysfs
from katapy.agent.upcall.sysfs import Sysfs, errno_of
from katapy.ttrpc.errors import FailedPrecondition


class CpuHotplug:
    """vCPU hotplug: CPU state read through ``cpus``; stores through ``sysfs`` (so the kernel's errno survives)."""

    def __init__(self, sysfs: Sysfs | None = None, cpus: CpuSysfs | None = None) -> None:
        self.sysfs = sysfs or Sysfs()
        self.cpus = cpus or CpuSysfs(self.sysfs.path(str(SYS_CPU).lstrip("/")))

    def _present(self) -> set[int]:
        try:
            return set(self.cpus.present())
        except FailedPrecondition as exc:  # CpuSysfs's error for an unreadable ``present``
            raise OSError(errno.EIO, exc.message) from None

    def _set(self, cpu: int, online: bool, present: set[int]) -> bool:
        """Put ``cpu`` in the wanted state; False if it already was; OSError as the kernel refuses."""
        cpus = self.cpus
        if cpu not in present:
            raise OSError(errno.ENODEV, f"cpu{cpu} is not present")
        if cpus.is_online(cpu) == online:
            return False
        if not cpus.hotpluggable(cpu):  # only reached going offline: a CPU without the file is always online
            raise OSError(errno.EBUSY, f"cpu{cpu} cannot be taken offline (no online file)")
        self.sysfs.write(cpus.root / f"cpu{cpu}" / "online", "1" if online else "0")
        return True

    def set_online(self, apic_ids: tuple[int, ...], online: bool) -> tuple[int, int]:
        """Every CPU of ``apic_ids`` online (or offline): ``(0, 0)`` or ``(-errno, index of the CPU that failed)``."""
        changed: list[int] = []
        index = 0
        try:
            present = self._present()
            for index, cpu in enumerate(apic_ids):  # noqa: B007 - the except clause reports index
                if self._set(cpu, online, present):
                    changed.append(cpu)
        except OSError as exc:
            self._undo(changed, online)
            log.warning("upcall: cpu hotplug failed", cpu=apic_ids[index], online=online, error=str(exc),
                        undone=len(changed))
            return -errno_of(exc), index
        log.info("upcall: cpus " + ("online" if online else "offline"), cpus=",".join(map(str, apic_ids)),
                 changed=len(changed))
        return 0, 0

    def add(self, apic_ids: tuple[int, ...]) -> tuple[int, int]:
        """ADD_CPU."""
        return self.set_online(apic_ids, True)

    def remove(self, apic_ids: tuple[int, ...]) -> tuple[int, int]:
        """DEL_CPU."""
        return self.set_online(apic_ids, False)

    def _undo(self, changed: list[int], online: bool) -> None:
        for cpu in reversed(changed):
            try:
                self.sysfs.write(self.cpus.root / f"cpu{cpu}" / "online", "0" if online else "1")
            except OSError as exc:
                log.error("upcall: cannot undo cpu hotplug", cpu=cpu, online=not online, error=str(exc))
