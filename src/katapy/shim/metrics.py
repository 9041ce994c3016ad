"""The shim's metrics endpoint for its sandbox (katapy.metrics): started once the sandbox VM runs.

``<sandbox dir>/metrics.sock`` answers ``GET /metrics`` from its own threads
(katapy.metrics.endpoint); each scrape reads the handler's sandbox as it is
then (attributes only: nothing waits on the trio loop) plus the Task API
request counts.  ``katapy monitor`` aggregates the sockets of every shim.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from katapy import log

if TYPE_CHECKING:
    from katapy.metrics.requests import RequestStats
    from katapy.metrics.sandbox import SandboxSample
    from katapy.shim.virt_container import VirtContainer

_log = log.get("shim.metrics")


class ShimMetrics:
    def __init__(self, handler: VirtContainer, requests: RequestStats) -> None:
        self.handler = handler
        self.requests = requests

    def sample(self) -> SandboxSample | None:
        from katapy.hypervisor.base import VmState
        from katapy.metrics.sandbox import SandboxSample

        sb = self.handler.sandbox
        hv = sb.hypervisor if sb is not None else None
        if sb is None or hv is None:
            return None
        state = hv.state()
        containers = self.handler.containers
        t = sb.times
        boot = {"vm_start": t.vm_start_s, "agent_connect": t.agent_connect_s, "create_sandbox": t.create_sandbox_s}
        return SandboxSample(
            hypervisor=hv.name, vm_state=state.value,
            up=state is VmState.RUNNING and sb.agent is not None and sb.vm_exit is None,
            vcpus=int(getattr(hv, "vcpus", 0)), memory_bytes=int(getattr(hv, "memory_mib", 0)) << 20,
            containers=len(containers.containers) if containers is not None else 0,
            shim_pid=os.getpid(), vmm_pid=sb.vmm_pid, boot_seconds={k: v for k, v in boot.items() if v})

    def render(self) -> bytes:
        from katapy.metrics.sandbox import scrape

        return scrape(self.sample, self.requests.families)

    async def run(self, started: trio.Event) -> None:
        """Serve from when ``started`` is set (the sandbox runs) until this task is cancelled (shim exit)."""
        from katapy.metrics.endpoint import SOCKET_NAME, MetricsEndpoint

        await started.wait()
        sb = self.handler.sandbox
        if sb is None:
            return
        endpoint = MetricsEndpoint(sb.dir / SOCKET_NAME, self.render)
        try:
            await trio.to_thread.run_sync(endpoint.start)
        except OSError as exc:  # metrics are for operators: the sandbox runs without them
            _log.error("metrics endpoint not served", socket=str(endpoint.path), error=str(exc))
            return
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(endpoint.close)
