"""UpdateInterface/UpdateRoutes/ListInterfaces/ListRoutes in a network namespace made by the test."""
from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from katapy.agent_client import AgentClient
from katapy.agent_client.types import Interface, IPAddress, Route

from .helpers import HostAgent


@pytest.fixture
def netns_agent(tmp_path: Path) -> Iterator[HostAgent]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    pytest.importorskip("pyroute2", reason="the agent's network calls use pyroute2")
    name = f"katapy-agent-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "eth7", "type", "veth", "peer", "name", "eth7p"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "eth7", "address", "02:00:00:aa:bb:cc"], check=True)
        agent = HostAgent(tmp_path, prefix=["ip", "netns", "exec", name])
        try:
            yield agent
        finally:
            agent.stop()
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_interfaces_and_routes(netns_agent: HostAgent) -> None:
    async def main() -> None:
        async with await AgentClient.connect_unix(netns_agent.socket, timeout=30) as agent:
            names = {i.name for i in await agent.list_interfaces()}
            assert names == {"lo", "eth7", "eth7p"}
            updated = await agent.update_interface(Interface(
                name="eth0", hw_addr="02:00:00:AA:BB:CC", mtu=1400,
                ip_addresses=[IPAddress("10.9.8.7", "24"), IPAddress("fd00::7", "64", 1)]))
            assert updated.name == "eth0" and updated.mtu == 1400 and updated.raw_flags & 1
            assert {(a.address, a.mask) for a in updated.ip_addresses} >= {("10.9.8.7", "24"), ("fd00::7", "64")}
            routes = await agent.update_routes([
                Route(dest="10.9.8.0/24", device="eth0", scope=253, source="10.9.8.7"),
                Route(dest="", gateway="10.9.8.1", device="eth0"),
                Route(dest="192.168.77.0/24", gateway="10.9.8.254", device="eth0"),
            ])
            v4 = {(r.dest, r.gateway, r.device) for r in routes if r.family == 0}
            assert ("", "10.9.8.1", "eth0") in v4
            assert ("192.168.77.0/24", "10.9.8.254", "eth0") in v4
            assert ("10.9.8.0/24", "", "eth0") in v4
            assert routes == await agent.list_routes()
            shown = subprocess.run(["ip", "netns", "identify", str(netns_agent.proc.pid)], capture_output=True,
                                   text=True).stdout.strip()
            assert shown.startswith("katapy-agent-")
            out = subprocess.run(["ip", "-n", shown, "route"], capture_output=True, text=True, check=True).stdout
            assert "default via 10.9.8.1 dev eth0" in out
            with pytest.raises(Exception, match="no interface"):
                await agent.update_interface(Interface(name="nosuch", hw_addr="02:00:00:00:00:99"))

    trio.run(main)
