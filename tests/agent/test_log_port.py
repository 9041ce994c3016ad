"""The agent's log reaches the host on vsock port 1025 once the host listens (hybrid vsock ``<uds>_1025``)."""
from __future__ import annotations

import socket
import time

import pytest
import trio

from .guest import GuestAgent
from .helpers import AgentTarget

LOG_PORT = 1025


def test_log_lines_reach_host_port_1025(agent_target: AgentTarget, agent_place: GuestAgent | None) -> None:
    if agent_place is None:
        pytest.skip("the log port is AF_VSOCK: only an agent in a guest dials it")
    path = f"{agent_place.uds}_{LOG_PORT}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)  # the guest is already up: the agent must redial, not only dial at start
        listener.listen(1)
        listener.settimeout(30)
        conn, _ = listener.accept()
        with conn:
            async def main() -> None:
                async with await agent_target.connect() as agent:
                    await agent.create_sandbox("logpod", [], "sb-log", agent_target.sandbox_storages())

            trio.run(main)
            conn.settimeout(2)
            text = b""
            deadline = time.monotonic() + 20
            while b'event="sandbox created"' not in text and time.monotonic() < deadline:
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                text += chunk
    lines = [l for l in text.decode(errors="replace").splitlines() if 'event="sandbox created"' in l]
    assert lines, f"no 'sandbox created' line on the log port; got {text[-500:]!r}"
    assert "component=agent" in lines[0] and "sandbox_id=sb-log" in lines[0] and "level=info" in lines[0]
