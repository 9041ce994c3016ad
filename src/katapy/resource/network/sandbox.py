"""A sandbox's pod network from start to stop: what the shim's SandboxManager calls.

    net = SandboxNetwork(netns_path, sandbox_id)
    await net.attach(hypervisor)        # before start_vm: taps, filters, one NIC per tap (cold-plugged)
    ... start_vm, agent connect, CreateSandbox ...
    await net.configure_guest(agent)    # UpdateInterface per NIC, UpdateRoutes
    await net.release()                 # after the VMM is gone: close fds, remove filters and taps

How the VMM gets its tap: the shim opens each tap *inside the pod netns*
(``pod.open_taps``, setns on a helper thread) and hands the fd over in
``NetDevice.tap_fd``.  QEMU inherits it (``-netdev tap,fd=N``), so QEMU itself
runs in the host netns next to its vhost-user and QMP sockets; the builtin
VMM would read and write the same fd.  The shim closes its copies at release.
"""
from __future__ import annotations

import os
from typing import Any

import trio

from katapy import log
from katapy.resource.network import guest, pod
from katapy.resource.network.types import NetworkError, PodNetwork


class SandboxNetwork:
    def __init__(self, netns_path: str, sandbox_id: str) -> None:
        self.netns_path = netns_path
        self.net: PodNetwork | None = None
        self.tap_fds: list[int] = []
        self._log = log.get("resource.network", sandbox_id=sandbox_id)

    async def attach(self, hypervisor: Any) -> None:
        """Set up the pod netns and add one NIC per endpoint to the (not yet started) hypervisor."""
        from katapy.hypervisor.base import NetDevice

        self.net = await trio.to_thread.run_sync(pod.setup, self.netns_path)
        self.tap_fds = await trio.to_thread.run_sync(pod.open_taps, self.net)
        for n, (ep, fd) in enumerate(zip(self.net.endpoints, self.tap_fds)):
            await hypervisor.add_device(NetDevice(f"net{n}", ep.tap_name, ep.guest_mac, tap_fd=fd))

    async def configure_guest(self, agent: Any) -> None:
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

    def close_fds(self) -> None:
        fds, self.tap_fds = self.tap_fds, []
        for fd in fds:
            os.close(fd)

    async def release(self) -> None:
        """Close the tap fds and remove filters and taps; idempotent, logs instead of raising."""
        self.close_fds()
        if self.net is None:
            return
        net, self.net = self.net, None
        try:
            await trio.to_thread.run_sync(pod.teardown, net)
        except NetworkError as exc:
            self._log.error("pod network teardown failed", error=str(exc))
