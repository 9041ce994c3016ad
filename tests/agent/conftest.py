"""Fixtures: an agent running as a host process, reached through the real AgentClient.

``agent_target`` is the seam for in-guest runs: a harness can override it
with a target whose ``connect`` dials hybrid vsock
(``AgentClient.connect(uds, 1024)``) and whose ``rootfs`` returns the guest
path of a busybox rootfs (``/run/katapy/shared/<cid>/rootfs``).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from katapy.agent_client import AgentClient
from .helpers import AgentTarget, HostAgent, cleanup_cgroups, make_busybox_rootfs


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the host-process agent needs root (crun, mounts, namespaces)"
    for tool in ("crun", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/bin/busybox").exists():
        return "/bin/busybox (busybox-static) is not installed"
    return None


@pytest.fixture
def host_agent(tmp_path: Path) -> Iterator[HostAgent]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    agent = HostAgent(tmp_path)
    try:
        yield agent
    finally:
        agent.stop()
        leaked = cleanup_cgroups()
        assert not leaked, f"processes left in container cgroups after the agent stopped: {leaked}"


@pytest.fixture
def agent_target(host_agent: HostAgent, tmp_path: Path) -> AgentTarget:
    rootfs_dir = tmp_path / "rootfs"

    def rootfs(cid: str) -> str:
        path = rootfs_dir / cid
        if not path.exists():
            make_busybox_rootfs(path)
        return str(path)

    async def connect() -> AgentClient:
        return await AgentClient.connect_unix(host_agent.socket, timeout=30)

    return AgentTarget(connect, rootfs, f"host agent at {host_agent.socket}")
