"""Read what CNI configured in a pod netns: veths, their addresses, routes, MTU, MAC (rtnetlink, rtnetlink(7)).

Runs inside the namespace (``netns.run_in_netns``) with a pyroute2 IPRoute
socket opened there.  Only veths are endpoints (the CNI bridge and ptp
plugins make veth pairs); link-local IPv6 addresses are left out (the guest
kernel makes its own), and only main-table unicast routes through the veth
are carried.
"""
from __future__ import annotations

import socket
from typing import Any

from katapy.resource.network.types import FAMILY_V4, FAMILY_V6, IpAddress, RouteInfo, VethInfo

RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_LINK = 253


def link_kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def _family(af: int) -> int:
    return FAMILY_V6 if af == socket.AF_INET6 else FAMILY_V4


def addresses(ipr: Any, index: int) -> tuple[IpAddress, ...]:
    out = []
    for a in ipr.get_addr(index=index):
        if a["family"] == socket.AF_INET6 and a["scope"] == RT_SCOPE_LINK:
            continue
        out.append(IpAddress(a.get_attr("IFA_ADDRESS"), int(a["prefixlen"]), _family(a["family"])))
    return tuple(out)


def routes(ipr: Any, index: int) -> tuple[RouteInfo, ...]:
    out = []
    for af in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=af, table=RT_TABLE_MAIN):
            if r["type"] != RTN_UNICAST or r.get_attr("RTA_OIF") != index:
                continue
            dst = r.get_attr("RTA_DST")
            if af == socket.AF_INET6 and dst and dst.startswith("fe80:"):
                continue
            out.append(RouteInfo(
                dest=f"{dst}/{r['dst_len']}" if dst else "",
                gateway=r.get_attr("RTA_GATEWAY") or "",
                source=r.get_attr("RTA_PREFSRC") or "",
                scope=int(r["scope"]),
                family=_family(af),
            ))
    return tuple(out)


def veths(ipr: Any) -> list[VethInfo]:
    """Every veth in the namespace the socket lives in, sorted by name."""
    out = []
    for link in ipr.get_links():
        if link_kind(link) != "veth":
            continue
        index = int(link["index"])
        out.append(VethInfo(
            name=link.get_attr("IFLA_IFNAME"),
            index=index,
            mac=link.get_attr("IFLA_ADDRESS"),
            mtu=int(link.get_attr("IFLA_MTU")),
            addresses=addresses(ipr, index),
            routes=routes(ipr, index),
        ))
    return sorted(out, key=lambda v: v.name)


def link_names(ipr: Any) -> list[str]:
    return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
