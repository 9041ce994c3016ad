"""Set up and tear down one pod's network for its VM (Kata runtime-rs ``resource/network``, tcfilter model).

``setup(netns_path)`` reads the veths CNI made, creates one tap per veth and
redirects traffic both ways; ``open_taps`` gives the VMM one fd per tap;
``teardown`` removes the filters and taps.  Every step runs in the pod netns
on a helper thread (``netns.run_in_netns``).  When the netns disappears
(CNI DEL ran, the bind mount was removed) setup and ``open_taps`` fail with a
NetworkError naming the path, and teardown has nothing left to do: the
kernel deleted the taps with the namespace.
"""
from __future__ import annotations

import os

from pyroute2 import IPRoute

from katapy import log
from katapy.resource.network import inspect, tap, tcfilter
from katapy.resource.network.netns import run_in_netns
from katapy.resource.network.types import Endpoint, NetworkError, PodNetwork

_log = log.get("resource.network")


def _setup_here(netns_path: str) -> PodNetwork:
    net = PodNetwork(netns_path)
    with IPRoute() as ipr:
        found = inspect.veths(ipr)
        if not found:
            raise NetworkError(f"pod network namespace {netns_path} has no veth (links: "
                               f"{', '.join(inspect.link_names(ipr))}); did CNI run?")
        try:
            for n, veth in enumerate(found):
                name = tap.tap_name(n)
                index = tap.create(ipr, name, veth.mtu)
                net.endpoints.append(Endpoint(veth, name, index))
                tcfilter.connect(ipr, veth.index, index)
        except BaseException:
            _teardown_here(net, ipr)
            raise
    return net


def _teardown_here(net: PodNetwork, ipr: IPRoute) -> None:
    for ep in net.endpoints:
        tcfilter.disconnect(ipr, ep.veth.index)
        tap.delete(ipr, ep.tap_name)  # its own ingress qdisc goes with it


def setup(netns_path: str) -> PodNetwork:
    """Taps and redirect filters for every veth in the pod netns (blocking; call from a worker thread)."""
    net = run_in_netns(netns_path, _setup_here, netns_path)
    for ep in net.endpoints:
        _log.info("pod endpoint connected", netns=netns_path, veth=ep.veth.name, tap=ep.tap_name,
                  mac=ep.guest_mac, mtu=ep.mtu, addresses=",".join(map(str, ep.veth.addresses)))
    return net


def open_taps(net: PodNetwork) -> list[int]:
    """One fd per endpoint's tap, opened inside the pod netns (the caller closes them)."""

    def here() -> list[int]:
        fds: list[int] = []
        try:
            for ep in net.endpoints:
                fds.append(tap.open_queue(ep.tap_name))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    return run_in_netns(net.netns_path, here)


def teardown(net: PodNetwork) -> None:
    """Remove the filters and taps ``setup`` made.  A vanished netns is not an error (nothing is left)."""
    if not net.endpoints:
        return
    if not os.path.exists(net.netns_path):
        _log.info("pod netns already gone; its taps went with it", netns=net.netns_path)
        net.endpoints.clear()
        return

    def here() -> None:
        with IPRoute() as ipr:
            _teardown_here(net, ipr)

    try:
        run_in_netns(net.netns_path, here)
    except NetworkError as exc:
        if os.path.exists(net.netns_path):
            raise
        _log.info("pod netns vanished during teardown", netns=net.netns_path, detail=str(exc))
    net.endpoints.clear()
    _log.info("pod network torn down", netns=net.netns_path)
