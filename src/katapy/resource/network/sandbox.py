"""A sandbox's pod network from start to stop: what the shim's SandboxManager calls.

    net = SandboxNetwork(netns_path, sandbox_id)
    await net.attach(hypervisor)        # before start_vm: taps, filters, one NIC per tap (cold-plugged)
    ... start_vm, agent connect, CreateSandbox ...
    await net.configure_guest(agent)    # UpdateInterface per NIC, UpdateRoutes
    await net.forward_ports(nursery, agent_socket)  # CRI PortForward into the guest (portforward)
    await net.release()                 # after the VMM is gone: stop forwarding, close fds, remove filters and taps

How the VMM gets its tap: the shim opens each tap *inside the pod netns*
(``pod.open_taps``, setns on a helper thread) and hands the fd over in
``NetDevice.tap_fd``.  QEMU inherits it (``-netdev tap,fd=N``), so QEMU itself
runs in the host netns next to its vhost-user and QMP sockets; the builtin
VMM would read and write the same fd.  The shim closes its copies at release.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from katapy import log
from katapy.resource.network import guest, pod
from katapy.resource.network.portforward import PortForwarder
from katapy.resource.network.types import NetworkError, PodNetwork

if TYPE_CHECKING:
    from katapy.agent_client.types import Interface, Route
    from katapy.hypervisor.base import NetDevice


class NicHost(Protocol):
    """What the network needs of the hypervisor: NICs added before the VM starts
    (``katapy.hypervisor.base.Hypervisor.add_device`` is one)."""

    async def add_device(self, dev: NetDevice) -> None: ...


class GuestNetworkAgent(Protocol):
    """What the network needs of the guest agent (``katapy.agent_client.AgentClient`` is one)."""

    async def update_interface(self, interface: Interface) -> Interface: ...

    async def update_routes(self, routes: list[Route]) -> list[Route]: ...


class SandboxNetwork:
    def __init__(self, netns_path: str, sandbox_id: str) -> None:
        self.netns_path = netns_path
        self.sandbox_id = sandbox_id
        self.net: PodNetwork | None = None
        self.tap_fds: list[int] = []
        self.port_forwarder: PortForwarder | None = None
        self._log = log.get("resource.network", sandbox_id=sandbox_id)

    async def attach(self, hypervisor: NicHost) -> None:
        """Set up the pod netns and add one NIC per endpoint to the (not yet started) hypervisor."""
        from katapy.hypervisor.base import NetDevice

        self.net = await trio.to_thread.run_sync(pod.setup, self.netns_path)
        self.tap_fds = await trio.to_thread.run_sync(pod.open_taps, self.net)
        for n, (ep, fd) in enumerate(zip(self.net.endpoints, self.tap_fds)):
            await hypervisor.add_device(NetDevice(f"net{n}", ep.tap_name, ep.guest_mac, tap_fd=fd))

    async def configure_guest(self, agent: GuestNetworkAgent) -> None:
        """Give the guest NICs the veths' names, MACs, MTUs, addresses, then the routes."""
        if self.net is None or not self.net.endpoints:
            return
        from katapy.ttrpc.errors import TtrpcError

        for iface in guest.interfaces(self.net):
            try:
                await agent.update_interface(iface)
            except TtrpcError as exc:
                raise NetworkError(f"the guest agent refused UpdateInterface {iface.name} ({iface.hw_addr}): "
                                   f"{exc}") from None
        routes = guest.routes(self.net)
        if routes:
            try:
                await agent.update_routes(routes)
            except TtrpcError as exc:
                raise NetworkError(f"the guest agent refused UpdateRoutes ({len(routes)} routes): {exc}") from None
        self._log.info("guest network configured", interfaces=len(self.net.endpoints), routes=len(routes))

    async def forward_ports(self, nursery: trio.Nursery, agent_socket: Path) -> None:
        """Serve CRI PortForward for this pod from ``nursery``.  A host that cannot (no iptables nat) gets an
        error in the log naming the cause; the pod runs on, and PortForward finds nobody listening."""
        fwd = PortForwarder(self.sandbox_id, self.netns_path, agent_socket)
        try:
            await nursery.start(fwd.run)
        except NetworkError as exc:
            self._log.error("port forwarding unavailable", error=str(exc))
            return
        self.port_forwarder = fwd

    def close_fds(self) -> None:
        fds, self.tap_fds = self.tap_fds, []
        for fd in fds:
            os.close(fd)

    async def release(self) -> None:
        """Stop port forwarding, close the tap fds and remove filters and taps; idempotent, logs instead of raising."""
        if self.port_forwarder is not None:
            fwd, self.port_forwarder = self.port_forwarder, None
            await fwd.stop()
        self.close_fds()
        if self.net is None:
            return
        net, self.net = self.net, None
        try:
            await trio.to_thread.run_sync(pod.teardown, net)
        except NetworkError as exc:
            self._log.error("pod network teardown failed", error=str(exc))
