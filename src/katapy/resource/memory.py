"""The sandbox VM's RAM, sized from its containers' memory limits (Kata runtime-rs ``resource/cpu_mem/mem.rs``).

Kata's rule (runtime-rs ``MemResource::update_mem_resources``; the Go
runtime's ``Sandbox.updateResources``): the VM gets the sandbox's default
memory plus the sum of its containers' memory limits,

    target = default_memory + sum over containers of limit

where a container without a limit (OCI ``linux.resources.memory.limit``
absent or <= 0; runtime-spec config-linux.md "Memory") adds nothing.  The
boot size (default plus the CRI pod-sizing annotation, katapy.shim.annotations)
is a floor.  Above the floor memory moves in whole hotplug blocks
(``HOTPLUG_BLOCK_MIB``, the guest's memory block), so the target is rounded
up to one; a target above ``[hypervisor] max_memory`` is capped there with a
warning, as Kata does: the container's own cgroup limit still holds.

Unlike vCPUs, the guest side of a memory resize is not the agent's RPC: the
hypervisor hot-adds a KVM slot and tells the guest through the upcall channel
(katapy.vmm.memory_hotplug).  A backend without memory hotplug
(``UnsupportedError``: QEMU's microvm) keeps its boot size: on container
create that is a warning (the VM stays as booted, the container's cgroup
limit applies); on an explicit update (``strict``) it is the caller's error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from katapy import log
from katapy.resource.cpu import ResizeError

MIB = 1 << 20
#: RAM is hot-added and removed in blocks of this size (katapy.vmm.memory_hotplug.BLOCK_SIZE)
HOTPLUG_BLOCK_MIB = 128


def memory_limit_mib(resources: dict[str, Any] | None) -> int | None:
    """The memory limit of OCI LinuxResources (JSON) in MiB, rounded up; None when there is none."""
    mem = (resources or {}).get("memory") or {}
    limit = mem.get("limit")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    return -(-limit // MIB)


@dataclass(frozen=True)
class MemoryPolicy:
    base: int  # MiB: [hypervisor] default_memory (or its annotation)
    floor: int  # MiB: the boot size; never shrunk below
    max_mib: int  # MiB: [hypervisor] max_memory

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.floor <= self.max_mib:
            raise ValueError(f"MemoryPolicy needs 0 < base ({self.base}) <= floor ({self.floor}) <= max "
                             f"({self.max_mib})")


@dataclass(frozen=True)
class MemoryTarget:
    mib: int  # what the VM gets
    wanted: int  # the rule's sum before rounding and the cap
    capped: bool


def memory_target(policy: MemoryPolicy, limits: list[int]) -> MemoryTarget:
    """The rule above: sum, rounded up to a hotplug block above the floor, capped at the largest block
    boundary not above max_memory."""
    wanted = policy.base + sum(limits)
    above = max(0, wanted - policy.floor)
    blocks = -(-above // HOTPLUG_BLOCK_MIB)
    max_blocks = (policy.max_mib - policy.floor) // HOTPLUG_BLOCK_MIB
    capped = blocks > max_blocks
    return MemoryTarget(policy.floor + min(blocks, max_blocks) * HOTPLUG_BLOCK_MIB, wanted, capped)


class MemoryResource:
    """One sandbox's RAM, kept at the rule's target as containers come, change and go (one resize at a time)."""

    def __init__(self, policy: MemoryPolicy, hypervisor: Any, sandbox_id: str = "") -> None:
        self.policy = policy
        self.hypervisor = hypervisor
        self.mib = policy.floor
        self.limits: dict[str, int] = {}
        self.unsupported = ""  # why this backend cannot resize memory, once it said so
        self._lock = trio.Lock()
        self._log = log.get("resource.memory", sandbox_id=sandbox_id)

    async def set_container(self, cid: str, resources: dict[str, Any] | None, strict: bool = False) -> int:
        limits = dict(self.limits)
        limit = memory_limit_mib(resources)
        if limit is None:
            limits.pop(cid, None)
        else:
            limits[cid] = limit
        return await self._apply(limits, cid, strict)

    async def remove_container(self, cid: str) -> int:
        """Forget ``cid``'s limit and give its memory back; a guest that cannot give it up keeps it (logged)."""
        limits = {k: v for k, v in self.limits.items() if k != cid}
        try:
            return await self._apply(limits, cid, strict=True)
        except ResizeError as exc:
            self.limits = limits
            self._log.warning("sandbox memory not shrunk after a container left", container_id=cid, error=str(exc),
                              memory_mib=self.mib)
            return self.mib

    async def _apply(self, limits: dict[str, int], cid: str, strict: bool) -> int:
        from katapy.hypervisor.base import HypervisorError, UnsupportedError, VmState

        async with self._lock:
            target = memory_target(self.policy, list(limits.values()))
            if target.capped:
                self._log.warning("memory target capped at max_memory", container_id=cid, wanted_mib=target.wanted,
                                  max_memory_mib=self.policy.max_mib)
            if target.mib != self.mib:
                state = self.hypervisor.state()
                if state is not VmState.RUNNING:
                    raise ResizeError(f"cannot resize the sandbox VM from {self.mib} to {target.mib} MiB: "
                                      f"the VM is {state.value}")
                try:
                    self.mib = await self.hypervisor.resize_memory(target.mib)
                except UnsupportedError as exc:
                    if strict:
                        raise ResizeError(f"cannot resize the sandbox VM from {self.mib} to {target.mib} MiB: "
                                          f"{exc}") from None
                    if not self.unsupported:
                        self._log.warning("sandbox memory stays as booted", container_id=cid, error=str(exc),
                                          memory_mib=self.mib, wanted_mib=target.mib)
                    self.unsupported = str(exc)
                except HypervisorError as exc:
                    self.mib = getattr(self.hypervisor, "memory_mib", self.mib)
                    raise ResizeError(f"cannot resize the sandbox VM from {self.mib} to {target.mib} MiB: "
                                      f"{exc}") from None
                else:
                    self._log.info("sandbox memory resized", container_id=cid, memory_mib=self.mib)
            self.limits = limits
            return self.mib
