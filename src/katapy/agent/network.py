"""Guest network configuration for UpdateInterface/UpdateRoutes/ListInterfaces/ListRoutes.

Uses pyroute2's IPRoute (rtnetlink, rtnetlink(7)), imported only when a
network call arrives: it costs seconds to import under TCG, and the agent
must be ready before that.  Field meanings follow Kata's types.proto:
an Interface is matched by MAC (``hwAddr``) or else by name, its addresses are
replaced by the requested ones, its MTU set and the link brought up; routes
are replaced as a whole (every non-kernel route of the main table is deleted,
then the requested ones added, link-scope routes first so gateways resolve).
"""
from __future__ import annotations

import socket
from typing import Any

from katapy.protocol.types import IP_FAMILY_V4 as FAMILY_V4
from katapy.protocol.types import IP_FAMILY_V6 as FAMILY_V6
from katapy.protocol.types import Interface, IPAddress, Route
from katapy.ttrpc.errors import InvalidArgument, NotFound

IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253


def _ipr():  # type: ignore[no-untyped-def]
    from pyroute2 import IPRoute

    return IPRoute()


def _af(family: int) -> int:
    return socket.AF_INET6 if family == FAMILY_V6 else socket.AF_INET


def _family(af: int) -> int:
    return FAMILY_V6 if af == socket.AF_INET6 else FAMILY_V4


def _interface(ipr: Any, link: Any) -> Interface:
    index = link["index"]
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
    addrs = [
        IPAddress(a.get_attr("IFA_ADDRESS"), str(a["prefixlen"]), _family(a["family"]))
        for a in ipr.get_addr(index=index)
    ]
    return Interface(
        name=link.get_attr("IFLA_IFNAME"),
        hw_addr=link.get_attr("IFLA_ADDRESS") or "",
        mtu=link.get_attr("IFLA_MTU") or 0,
        ip_addresses=addrs,
        type=kind or "",
        raw_flags=link["flags"],
    )


def list_interfaces() -> list[Interface]:
    with _ipr() as ipr:
        return [_interface(ipr, link) for link in ipr.get_links()]


def _find_link(ipr: Any, iface: Interface) -> Any:
    for link in ipr.get_links():
        if iface.hw_addr and (link.get_attr("IFLA_ADDRESS") or "").lower() == iface.hw_addr.lower():
            return link
    for link in ipr.get_links():
        if iface.name and link.get_attr("IFLA_IFNAME") == iface.name:
            return link
    raise NotFound(f"no interface with hwAddr {iface.hw_addr!r} or name {iface.name!r}")


def update_interface(iface: Interface) -> Interface:
    """Apply name, MTU and addresses to the matching link and bring it up."""
    for a in iface.ip_addresses:
        if not a.mask.isdigit() or int(a.mask) > (128 if a.family == FAMILY_V6 else 32):
            raise InvalidArgument(f"bad prefix length {a.mask!r} for {a.address}")
    with _ipr() as ipr:
        link = _find_link(ipr, iface)
        index = link["index"]
        ipr.link("set", index=index, state="down")
        changes: dict[str, Any] = {}
        if iface.name and iface.name != link.get_attr("IFLA_IFNAME"):
            changes["ifname"] = iface.name
        if iface.mtu:
            changes["mtu"] = iface.mtu
        if changes:
            ipr.link("set", index=index, **changes)
        for old in ipr.get_addr(index=index):
            ipr.addr("del", index=index, address=old.get_attr("IFA_ADDRESS"), prefixlen=old["prefixlen"])
        for a in iface.ip_addresses:
            ipr.addr("add", index=index, address=a.address, prefixlen=int(a.mask), family=_af(a.family))
        ipr.link("set", index=index, state="up")
        return _interface(ipr, ipr.get_links(index)[0])


def _route(ipr: Any, r: Any, names: dict[int, str]) -> Route:
    dst = r.get_attr("RTA_DST")
    return Route(
        dest=f"{dst}/{r['dst_len']}" if dst else "",
        gateway=r.get_attr("RTA_GATEWAY") or "",
        device=names.get(r.get_attr("RTA_OIF"), ""),
        source=r.get_attr("RTA_PREFSRC") or "",
        scope=r["scope"],
        family=_family(r["family"]),
        flags=r["flags"],
    )


def list_routes() -> list[Route]:
    with _ipr() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        out = []
        for af in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=af, table=RT_TABLE_MAIN):
                if r["type"] == 1:  # RTN_UNICAST only (no local/broadcast/multicast)
                    out.append(_route(ipr, r, names))
        return out


def update_routes(routes: list[Route]) -> list[Route]:
    with _ipr() as ipr:
        index = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}
        for r in routes:
            if r.device and r.device not in index:
                raise NotFound(f"route {r.dest or 'default'}: no device {r.device!r}")
        for af in (socket.AF_INET, socket.AF_INET6):
            for old in ipr.get_routes(family=af, table=RT_TABLE_MAIN):
                if old["proto"] != RTPROT_KERNEL and old["type"] == 1:
                    ipr.route("del", **_route_args(old))
        for r in sorted(routes, key=lambda r: r.scope != RT_SCOPE_LINK):
            args: dict[str, Any] = {"family": _af(r.family), "scope": r.scope, "table": RT_TABLE_MAIN}
            args["dst"] = r.dest or ("default" if r.family == FAMILY_V4 else "::/0")
            if r.gateway:
                args["gateway"] = r.gateway
            if r.device:
                args["oif"] = index[r.device]
            if r.source:
                args["prefsrc"] = r.source
            try:
                ipr.route("replace", **args)
            except Exception as exc:  # pyroute2 NetlinkError
                raise InvalidArgument(f"route {r}: {exc}") from None
    return list_routes()


def _route_args(r: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"family": r["family"], "table": RT_TABLE_MAIN, "dst_len": r["dst_len"]}
    for attr, key in (("RTA_DST", "dst"), ("RTA_GATEWAY", "gateway"), ("RTA_OIF", "oif")):
        value = r.get_attr(attr)
        if value is not None:
            args[key] = value
    return args
