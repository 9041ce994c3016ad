"""The sandbox VM's vCPUs, sized from its containers' CPU limits (Kata runtime-rs ``resource/cpu_mem/cpu.rs``).

Kata's rule (runtime-rs ``CpuResource::calc_cpu_resources``, the Go runtime's
``Sandbox.updateResources``): the VM gets the sandbox's default vCPUs plus
the pod's CPU limits rounded up,

    target = default_vcpus + ceil(sum over containers of quota / period)

where a container without a CFS quota (OCI ``linux.resources.cpu.quota`` <= 0
or no period; runtime-spec config-linux.md "CPU") adds nothing.  A target
above ``[hypervisor] max_vcpus`` is capped there with a warning, as Kata
does, rather than failing the container: the container's own cgroup quota
still limits it.

Boot-time sizing and live sizing agree: the CRI pod-sizing annotations
(``io.kubernetes.cri.sandbox-cpu-quota``/``-period``, katapy.shim.annotations)
are kubelet's sum of the same containers' limits, so the VM boots with
``base + ceil(pod quota)`` vCPUs online and that boot size is a floor the
live size never goes below; the live sum starts again from ``base``, so the
pod's limits are never counted twice.

The order of a resize follows runtime-rs: this module decides the target,
the hypervisor says what it can give (``Hypervisor.resize_vcpus``: range,
VM state, its vCPUs), the agent onlines or offlines guest CPUs
(``SetOnlineCPUs``).  Growing asks the hypervisor first, then the agent;
shrinking asks the agent first (the guest gives the CPUs up), then the
hypervisor.  A failure leaves both where they were and raises ResizeError.

On a backend with real vCPU hotplug (the builtin VMM, katapy.vmm.vcpu_hotplug)
the hypervisor's grow already has the guest online the new CPUs (upcall
ADD_CPU), so the agent's SetOnlineCPUs that follows finds them online and
changes nothing; its shrink offlines them through DEL_CPU, which finds them
already offline after the agent's call, and then parks their threads.  When
the hypervisor's half fails after it changed something (an unanswered ADD_CPU
keeps the new vCPUs; a failed shrink after the agent offlined), the other
half is put back as far as it goes (best effort, logged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import trio

from katapy import log

AGENT_TIMEOUT_S = 30.0


class ResizeError(Exception):
    """The VM could not be given the vCPUs asked for; nothing was changed."""


def cpu_limit(resources: dict[str, Any] | None) -> Fraction | None:
    """``quota / period`` of OCI LinuxResources (JSON), or None for a container without a CFS quota."""
    cpu = (resources or {}).get("cpu") or {}
    quota, period = cpu.get("quota"), cpu.get("period")
    if not isinstance(quota, int) or not isinstance(period, int) or quota <= 0 or period <= 0:
        return None
    return Fraction(quota, period)


@dataclass(frozen=True)
class VcpuPolicy:
    """The numbers the rule needs: Kata's ``default_vcpus``, the boot size, the configured maximum."""

    base: int  # the sandbox's default vCPUs ([hypervisor] default_vcpus or its io.katapy annotation)
    floor: int  # the boot size (base plus the CRI pod-sizing annotations); never shrunk below
    max_vcpus: int

    def __post_init__(self) -> None:
        if not 1 <= self.base <= self.floor <= self.max_vcpus:
            raise ValueError(f"VcpuPolicy needs 1 <= base ({self.base}) <= floor ({self.floor}) <= max_vcpus "
                             f"({self.max_vcpus})")


@dataclass(frozen=True)
class VcpuTarget:
    vcpus: int  # what the VM gets
    wanted: int  # what the rule asked for before the cap
    capped: bool


def vcpu_target(policy: VcpuPolicy, limits: list[Fraction]) -> VcpuTarget:
    """The rule above for the given per-container limits (None entries already left out)."""
    wanted = max(policy.floor, policy.base + math.ceil(sum(limits, Fraction(0))))
    return VcpuTarget(vcpus=min(wanted, policy.max_vcpus), wanted=wanted, capped=wanted > policy.max_vcpus)


class CpuResource:
    """One sandbox's vCPU count, kept at the rule's target as containers come, change and go.

    ``hypervisor`` is a started ``katapy.hypervisor.Hypervisor``; ``agent`` a connected AgentClient.
    Calls are serialised: one resize at a time.
    """

    def __init__(self, policy: VcpuPolicy, hypervisor: Any, agent: Any, sandbox_id: str = "") -> None:
        self.policy = policy
        self.hypervisor = hypervisor
        self.agent = agent
        self.vcpus = policy.floor  # online now
        self.limits: dict[str, Fraction] = {}
        self._lock = trio.Lock()
        self._log = log.get("resource.cpu", sandbox_id=sandbox_id)

    async def set_container(self, cid: str, resources: dict[str, Any] | None) -> int:
        """Record ``cid``'s limit from its OCI resources and resize; the vCPUs now online."""
        limits = dict(self.limits)
        limit = cpu_limit(resources)
        if limit is None:
            limits.pop(cid, None)
        else:
            limits[cid] = limit
        return await self._apply(limits, cid)

    async def remove_container(self, cid: str) -> int:
        """Forget ``cid``'s limit and give its vCPUs back."""
        limits = {k: v for k, v in self.limits.items() if k != cid}
        return await self._apply(limits, cid)

    async def _apply(self, limits: dict[str, Fraction], cid: str) -> int:
        async with self._lock:
            target = vcpu_target(self.policy, list(limits.values()))
            if target.capped:
                self._log.warning("vCPU target capped at max_vcpus", container_id=cid, wanted=target.wanted,
                                  max_vcpus=self.policy.max_vcpus)
            if target.vcpus != self.vcpus:
                await self._resize(target.vcpus)
            self.limits = limits
            return self.vcpus

    async def _resize(self, n: int) -> None:
        from katapy.hypervisor.base import HypervisorError, VmState

        old = self.vcpus
        state = self.hypervisor.state()
        if state is not VmState.RUNNING:
            raise ResizeError(f"cannot resize the sandbox VM from {old} to {n} vCPUs: the VM is {state.value}")
        try:
            if n > old:
                try:
                    granted = await self.hypervisor.resize_vcpus(n)
                except HypervisorError:
                    await self._restore_hypervisor(old)
                    raise
                try:
                    online = await self._online(granted)
                except ResizeError:
                    await self.hypervisor.resize_vcpus(old)
                    raise
            else:
                online = await self._online(n)
                try:
                    await self.hypervisor.resize_vcpus(online)
                except HypervisorError:
                    await self._restore_agent(old)
                    raise
        except HypervisorError as exc:
            raise ResizeError(f"cannot resize the sandbox VM from {old} to {n} vCPUs: {exc}") from None
        self.vcpus = online
        self._log.info("sandbox vCPUs resized", old=old, new=online)

    async def _restore_hypervisor(self, old: int) -> None:
        """A grow the hypervisor failed but kept (in doubt): take it back to ``old``."""
        from katapy.hypervisor.base import HypervisorError

        now = getattr(self.hypervisor, "vcpus", old)
        if now == old:
            return
        try:
            await self.hypervisor.resize_vcpus(old)
        except HypervisorError as exc:
            self._log.error("cannot take the hypervisor back after a failed grow", vcpus=now, wanted=old,
                            error=str(exc))

    async def _restore_agent(self, old: int) -> None:
        """A shrink the hypervisor refused after the guest offlined: online the CPUs again."""
        try:
            await self._online(old)
        except ResizeError as exc:
            self._log.error("cannot online the guest's CPUs again after a failed shrink", wanted=old,
                            error=str(exc))

    async def _online(self, n: int) -> int:
        from katapy.ttrpc.errors import TtrpcError

        try:
            got = await self.agent.set_online_cpus(n, timeout=AGENT_TIMEOUT_S)
        except TtrpcError as exc:
            raise ResizeError(f"the guest could not set {n} online CPUs: {exc.message}") from None
        if got.online != n:
            raise ResizeError(f"the guest has {got.online} CPUs online after asking for {n}")
        return got.online
