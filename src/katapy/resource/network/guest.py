"""The agent's view of a pod network: UpdateInterface / UpdateRoutes values (Kata agent.proto, types.proto).

The guest NIC is found by MAC (the veth's), renamed to the veth's name and
given its MTU and addresses; routes name that device.  Routes with scope
link go first so gateways are reachable when the default route is added
(the agent sorts them that way too).
"""
from __future__ import annotations

from katapy.agent_client.types import IP_FAMILY_V4, IP_FAMILY_V6, Interface, IPAddress, Route
from katapy.resource.network.types import FAMILY_V6, PodNetwork


def _agent_family(family: int) -> int:
    return IP_FAMILY_V6 if family == FAMILY_V6 else IP_FAMILY_V4


def interfaces(net: PodNetwork) -> list[Interface]:
    return [
        Interface(
            name=ep.veth.name,
            hw_addr=ep.guest_mac,
            mtu=ep.mtu,
            ip_addresses=[IPAddress(a.address, str(a.prefixlen), _agent_family(a.family))
                          for a in ep.veth.addresses],
        )
        for ep in net.endpoints
    ]


def routes(net: PodNetwork) -> list[Route]:
    out = []
    for ep in net.endpoints:
        for r in ep.veth.routes:
            out.append(Route(dest=r.dest, gateway=r.gateway, device=ep.veth.name, source=r.source,
                             scope=r.scope, family=_agent_family(r.family)))
    return sorted(out, key=lambda r: r.scope != 253)
