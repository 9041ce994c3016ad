"""Fixtures: the agent under test, in each place it runs, reached through the real AgentClient.

``agent_target`` is parametrized over where the agent runs, so every test
that takes it runs once per place:

* ``host``: ``python -m katapy.agent --listen unix:`` as a host process (one per test);
* ``guest-qemu``: the agent as PID 1 of a guest booted by the qemu backend
  (QEMU/TCG on this kvm-pvm host), hybrid vsock through katapy's vhost-user
  vsock device, container rootfs through katapy's virtio-fs share; one VM
  per test module (``guest`` marker);
* ``guest-builtin``: the same guest on katapy's built-in VMM (``kvm`` marker:
  on a kvm-pvm host it runs inside the nested KVM harness).
"""
from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from katapy.agent_client import AgentClient
from .guest import GuestAgent, guest_config
from .helpers import AgentTarget, HostAgent, cleanup_cgroups, make_busybox_rootfs

PLACES = [
    pytest.param("host", id="host"),
    pytest.param("qemu", id="guest-qemu", marks=pytest.mark.guest),
    pytest.param("builtin", id="guest-builtin", marks=[pytest.mark.guest, pytest.mark.kvm]),
]


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


@pytest.fixture(scope="module", params=PLACES)
def agent_place(request: pytest.FixtureRequest) -> Iterator[GuestAgent | None]:
    """None for the host process; else one booted guest shared by the module's tests."""
    if request.param == "host":
        yield None
        return
    cfg, reason = guest_config(request.param)
    if reason:
        pytest.skip(reason)
    assert cfg is not None
    guest = GuestAgent(cfg, request.param)
    try:
        yield guest
    finally:
        guest.close()


def _host_target(host_agent: HostAgent, tmp_path: Path) -> AgentTarget:
    rootfs_dir = tmp_path / "rootfs"

    def rootfs(cid: str) -> str:
        path = rootfs_dir / cid
        if not path.exists():
            make_busybox_rootfs(path)
        return str(path)

    async def connect() -> AgentClient:
        return await AgentClient.connect_unix(host_agent.socket, timeout=30)

    def raw_connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(host_agent.socket))
        return s

    return AgentTarget(connect, rootfs, f"host agent at {host_agent.socket}", raw_connect=raw_connect,
                       alive=lambda: host_agent.proc.poll() is None, scratch=str(tmp_path / "scratch"),
                       resolv_conf=str(host_agent.resolv_conf))


@pytest.fixture
def agent_target(agent_place: GuestAgent | None, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[AgentTarget]:
    if agent_place is None:
        yield _host_target(request.getfixturevalue("host_agent"), tmp_path)
        return
    if not agent_place.vm.alive():
        pytest.fail(f"the {agent_place.backend} guest is no longer running; console tail:\n"
                    f"{agent_place.console()[-2000:]}")
    try:
        yield agent_place.target()
    finally:
        agent_place.reset()
