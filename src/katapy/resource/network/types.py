"""Plain-data descriptions of a pod's network, as katapy carries it into the VM.

A CNI plugin leaves one veth per network in the pod's netns (CNI spec,
"Network Configuration" / "Result": interfaces, ips, routes).  katapy puts a
tap next to each veth, joins the two with tc redirect filters
(``tcfilter``), and gives the guest NIC on that tap the veth's MAC, MTU,
addresses and routes, so that the guest *is* the pod endpoint CNI configured.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FAMILY_V4 = 4
FAMILY_V6 = 6


class NetworkError(Exception):
    """The pod network cannot be set up or torn down; the message says which step and why."""


@dataclass(frozen=True)
class IpAddress:
    """One address of the veth (rtnetlink ``ifaddrmsg``: IFA_ADDRESS + ifa_prefixlen)."""

    address: str
    prefixlen: int
    family: int = FAMILY_V4

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class RouteInfo:
    """One main-table unicast route through the veth (rtnetlink ``rtmsg``)."""

    dest: str = ""  # "a.b.c.d/len"; "" for the default route
    gateway: str = ""
    source: str = ""
    scope: int = 0  # RT_SCOPE_UNIVERSE 0, RT_SCOPE_LINK 253
    family: int = FAMILY_V4


@dataclass(frozen=True)
class VethInfo:
    """A veth as CNI left it in the pod netns."""

    name: str
    index: int
    mac: str
    mtu: int
    addresses: tuple[IpAddress, ...] = ()
    routes: tuple[RouteInfo, ...] = ()


@dataclass(frozen=True)
class Endpoint:
    """A veth joined to a tap: what the hypervisor (NIC) and the agent (interface, routes) need."""

    veth: VethInfo
    tap_name: str
    tap_index: int

    @property
    def guest_mac(self) -> str:
        """The guest NIC answers for the pod IP, so it takes the veth's MAC."""
        return self.veth.mac

    @property
    def mtu(self) -> int:
        return self.veth.mtu


@dataclass
class PodNetwork:
    """Everything katapy added to one pod netns; ``teardown`` removes exactly this."""

    netns_path: str
    endpoints: list[Endpoint] = field(default_factory=list)

    @property
    def tap_names(self) -> list[str]:
        return [e.tap_name for e in self.endpoints]
