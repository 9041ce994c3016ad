"""Dial the agent of a VM that was just started, watching the VM while the dial retries.

The sandbox's policy (Kata runtime-rs: ``VirtSandbox`` starts the agent on the
address its hypervisor gives): the hypervisor offers the address, its
hybrid-vsock socket (``Hypervisor.agent_socket``), and the VM's end
(``wait_exit``, the console log); ``katapy.agent_client`` offers the
connection (``AgentClient.connect``, ``CONNECT <port>`` then ttrpc); this
module puts them together for ``SandboxManager`` and ``katapy.testing.sandbox``.

The agent listens on a vsock port once the guest has booted; the runtime dials
it through the VMM's hybrid-vsock socket (``CONNECT <port>``, see
docs/protocols.md §5) and retries until it answers or the dial timeout
(``[agent] dial_timeout``) runs out.  Two ways to fail, each with what a user
needs to see where the guest stopped:

* the VM ends first (kernel panic, triple fault, VMM killed): fail at once
  rather than retrying for the rest of the timeout, with the VM's exit and
  its console's tail in the message (:class:`VmEndedBeforeAgent`);
* the dial times out while the VM still runs (guest stuck in boot, agent not
  started, agent on another port): the dial's own error, carrying the end of
  the console as an exception note (``add_note``; :func:`console_notes`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from katapy.hypervisor.base import Hypervisor, HypervisorError, VmExit, read_tail

if TYPE_CHECKING:
    from katapy.agent_client import AgentClient

STILL_RUNS_NOTE = "the VM still runs; the end of its console:\n"


class VmEndedBeforeAgent(HypervisorError):
    """The VM ended before its agent answered the dial."""

    def __init__(self, exit_: VmExit) -> None:
        super().__init__(f"the VM ended before the agent answered: {exit_.reason} ({exit_.detail}); "
                         f"console tail:\n{exit_.console_tail[-1500:]}")
        self.vm_exit = exit_


def console_tail(path: Path | None) -> str:
    """The end of a VM's console log ("" when there is none)."""
    return read_tail(path) if path is not None else ""


def console_notes(exc: BaseException) -> str:
    """The console tail :func:`dial_agent` noted on a timed-out dial ("" if none)."""
    for note in getattr(exc, "__notes__", ()):
        if note.startswith(STILL_RUNS_NOTE):
            return note[len(STILL_RUNS_NOTE):]
    return ""


def last_lines(console: str, n: int = 3) -> str:
    """The last ``n`` non-blank lines of a console, joined with " | " for a one-line message."""
    lines = [line.strip() for line in console.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) if lines else "(nothing)"


async def dial_agent(hv: Hypervisor, port: int, timeout: float, console: Path | None = None) -> AgentClient:
    """Dial the agent over hybrid vsock; returns a connected ``katapy.agent_client.AgentClient``.

    Fails at once with :class:`VmEndedBeforeAgent` if the VM ends first; a dial
    that times out while the VM runs re-raises the dial's error with the tail
    of ``console`` (the VM's console log) as a note.
    """
    from katapy.agent_client import AgentClient  # on first dial: the shim starts without protobuf loaded

    result: dict[str, Any] = {}

    async def dial(cancel: trio.CancelScope) -> None:
        try:
            result["agent"] = await AgentClient.connect(hv.agent_socket(), port=port, timeout=timeout)
        except Exception as exc:  # re-raised below, outside the nursery's exception group
            result["error"] = exc
        cancel.cancel()

    async def watch(cancel: trio.CancelScope) -> None:
        result["exit"] = await hv.wait_exit()
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dial, nursery.cancel_scope)
        nursery.start_soon(watch, nursery.cancel_scope)
    if "agent" in result:
        return result["agent"]
    if "error" in result:
        err: BaseException = result["error"]
        tail = console_tail(console)
        if tail:
            err.add_note(STILL_RUNS_NOTE + tail)
        raise err
    raise VmEndedBeforeAgent(result["exit"])
