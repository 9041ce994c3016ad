"""Set the number of online CPUs exactly, through sysfs (the agent's half of a vCPU resize).

Kernel ABI: Documentation/ABI/stable/sysfs-devices-system-cpu and
Documentation/core-api/cpu_hotplug.rst.  ``/sys/devices/system/cpu/present``
lists the CPUs the machine has (a range list such as ``0-3``); each
``cpuN/online`` reads ``1``/``0`` and accepts a write of ``1`` (bring up) or
``0`` (take down).  A CPU without an ``online`` file cannot be taken down: on
x86 that is CPU 0 unless the kernel was built with BOOTPARAM_HOTPLUG_CPU0.
CPUs kept offline at boot by ``maxcpus=<n>``
(Documentation/admin-guide/kernel-parameters.txt) are present and can be
onlined here later.

Policy (Kata's agent does the same for growing): to grow, online the lowest
offline CPUs; to shrink, offline the highest online ones; CPU 0 is never
taken down.  A write the kernel refuses (``EBUSY`` for a CPU it will not
take down, ``EIO`` for one that does not come up) undoes what this call
already changed, so the guest is left with the CPUs it had, and the error
names the CPU and the kernel's reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from katapy.ttrpc.errors import FailedPrecondition, InvalidArgument

SYS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class OnlineCpus:
    """The guest's CPUs after a change: how many are online, out of how many present."""

    online: int
    present: int
    online_ids: tuple[int, ...] = ()


def parse_cpu_list(text: str) -> list[int]:
    """A sysfs CPU list (``0-2,4``; Documentation/admin-guide/cputopology.rst) as sorted ids."""
    ids: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        ids.update(range(int(low), int(high or low) + 1))
    return sorted(ids)


class CpuSysfs:
    """The CPU hotplug files under ``root`` (``/sys/devices/system/cpu``; a tmp tree in the tests)."""

    def __init__(self, root: Path = SYS_CPU) -> None:
        self.root = Path(root)

    def present(self) -> list[int]:
        try:
            return parse_cpu_list((self.root / "present").read_text())
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"cannot read {self.root / 'present'}: {exc}") from None

    def _online_file(self, cpu: int) -> Path:
        return self.root / f"cpu{cpu}" / "online"

    def hotpluggable(self, cpu: int) -> bool:
        return self._online_file(cpu).exists()

    def is_online(self, cpu: int) -> bool:
        try:
            return self._online_file(cpu).read_text().strip() == "1"
        except FileNotFoundError:
            return True  # no online file: always online (CPU 0 on x86)

    def write(self, cpu: int, online: bool) -> None:
        """Bring ``cpu`` up or down; raise FailedPrecondition with the kernel's reason."""
        try:
            with open(self._online_file(cpu), "w") as f:
                f.write("1" if online else "0")
        except OSError as exc:
            what = "online" if online else "offline"
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise FailedPrecondition(f"cpu{cpu} refused to go {what}: {reason}") from None

    def state(self) -> OnlineCpus:
        present = self.present()
        ids = tuple(c for c in present if self.is_online(c))
        return OnlineCpus(online=len(ids), present=len(present), online_ids=ids)


def set_online_cpus(target: int, sysfs: CpuSysfs | None = None) -> OnlineCpus:
    """Make exactly ``target`` CPUs online; return the resulting state.

    ``target`` must be in 1..present.  On a refused write every CPU this call
    changed is put back and FailedPrecondition names the CPU that refused.
    """
    sysfs = sysfs or CpuSysfs()
    present = sysfs.present()
    if not 1 <= target <= len(present):
        raise InvalidArgument(f"cannot have {target} CPUs online: the guest has {len(present)} present "
                              f"({sysfs.root / 'present'}) and CPU 0 always stays online")
    online = [c for c in present if sysfs.is_online(c)]
    grow = target > len(online)
    if grow:
        todo = [c for c in present if c not in online][: target - len(online)]
    else:
        removable = [c for c in reversed(online) if c != 0 and sysfs.hotpluggable(c)]
        todo = removable[: len(online) - target]
        if len(todo) < len(online) - target:
            raise FailedPrecondition(f"cannot take the guest down to {target} CPUs: only {len(removable)} of its "
                                     f"{len(online)} online CPUs can go offline (CPU 0 and CPUs without an "
                                     "online file stay)")
    done: list[int] = []
    try:
        for cpu in todo:
            sysfs.write(cpu, grow)
            done.append(cpu)
    except FailedPrecondition as exc:
        undo_errors = _undo(sysfs, done, grow)
        after = sysfs.state()
        note = f"; undoing also failed: {'; '.join(undo_errors)}" if undo_errors else ""
        raise FailedPrecondition(f"setting {target} online CPUs (from {len(online)}): {exc.message}; "
                                 f"{after.online} CPUs online now{note}") from None
    return sysfs.state()


def _undo(sysfs: CpuSysfs, done: list[int], grew: bool) -> list[str]:
    errors = []
    for cpu in reversed(done):
        try:
            sysfs.write(cpu, not grew)
        except FailedPrecondition as exc:
            errors.append(exc.message)
    return errors
