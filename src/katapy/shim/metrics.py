"""The shim's metrics endpoint for its sandbox (katapy.metrics): started once the sandbox VM runs.

``<sandbox dir>/metrics.sock`` answers ``GET /metrics`` from its own threads
(katapy.metrics.endpoint); each scrape reads the handler's sandbox as it is
then (attributes only: nothing waits on the trio loop) plus the Task API
request counts.  ``katapy monitor`` aggregates the sockets of every shim.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import trio

from katapy import log

if TYPE_CHECKING:
    from katapy.metrics.requests import RequestStats
    from katapy.metrics.sandbox import SandboxSample
    from katapy.shim.virt_container import VirtContainer

_log = log.get("shim.metrics")

#: how long a scrape waits for the guest agent's GetMetrics
GUEST_TIMEOUT_S = 1.0


def _call(hv: object, method: str) -> Any:
    """``hv.method()`` where the backend has it (the builtin VMM's counters), else None: no such family."""
    f = getattr(hv, method, None)
    return f() if f is not None else None


class ShimMetrics:
    def __init__(self, handler: VirtContainer, requests: RequestStats) -> None:
        self.handler = handler
        self.requests = requests
        self._token: trio.lowlevel.TrioToken | None = None

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
            shim_pid=os.getpid(), vmm_pid=sb.vmm_pid, boot_seconds={k: v for k, v in boot.items() if v},
            vm_exits=_call(hv, "exit_counts"), virtio=_call(hv, "virtio_counts"))

    def guest(self) -> list[Any]:
        """``katapy_guest_up`` and, when the agent answered in time with acceptable text, its families."""
        from katapy.metrics import guest

        text = self._ask_agent()
        if text is None:
            return [guest.up(False)]
        try:
            fams = guest.parse(text)
        except guest.GuestMetricsError as exc:
            _log.warning("guest metrics refused", error=str(exc))
            return [guest.up(False)]
        return [guest.up(True), *fams]

    def _ask_agent(self) -> str | None:
        """GetMetrics through the shim's trio loop, waited for at most GUEST_TIMEOUT_S + a margin from this
        (the endpoint's) thread, whatever state the loop or the guest is in."""
        sb, token = self.handler.sandbox, self._token
        if sb is None or sb.agent is None or token is None:
            return None
        agent = sb.agent
        done = threading.Event()
        result: list[str] = []

        async def call() -> None:
            try:
                with trio.move_on_after(GUEST_TIMEOUT_S):
                    result.append(await agent.get_metrics(timeout=GUEST_TIMEOUT_S))
            except Exception as exc:  # a dead or garbled agent: no guest figures this time
                _log.debug("guest metrics not read", error=repr(exc))
            finally:
                done.set()

        try:
            token.run_sync_soon(lambda: self.handler.nursery.start_soon(call))
        except trio.RunFinishedError:
            return None
        if not done.wait(GUEST_TIMEOUT_S + 0.5):
            return None
        return result[0] if result else None

    def render(self) -> bytes:
        from katapy.metrics.sandbox import scrape

        return scrape(self.sample, lambda: [*self.guest(), *self.requests.families()])

    async def run(self, started: trio.Event) -> None:
        """Serve from when ``started`` is set (the sandbox runs) until this task is cancelled (shim exit)."""
        from katapy.metrics.endpoint import SOCKET_NAME, MetricsEndpoint

        self._token = trio.lowlevel.current_trio_token()
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
