"""Plain values of the agent API shared by the agent and its host client (standard library only).

Field meanings follow Kata's agent.proto Storage and types.proto
Interface/IPAddress/Route; katapy.agent_client.types re-exports them for the host side.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IP_FAMILY_V4 = 0  # types.IPFamily v4
IP_FAMILY_V6 = 1  # types.IPFamily v6


@dataclass(frozen=True)
class Storage:
    """agent.proto Storage: a guest mount the agent performs."""

    driver: str
    source: str
    fstype: str
    mount_point: str
    options: list[str] = field(default_factory=list)
    driver_options: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IPAddress:
    address: str
    mask: str  # prefix length, decimal
    family: int = IP_FAMILY_V4


@dataclass(frozen=True)
class Interface:
    """types.proto Interface; matched by ``hw_addr`` (MAC), else by ``name``."""

    name: str
    hw_addr: str = ""
    mtu: int = 0
    ip_addresses: list[IPAddress] = field(default_factory=list)
    device: str = ""
    type: str = ""
    raw_flags: int = 0


@dataclass(frozen=True)
class Route:
    """types.proto Route; ``dest`` "a.b.c.d/len", empty for the default route."""

    dest: str = ""
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0  # rtnetlink RT_SCOPE_*
    family: int = IP_FAMILY_V4
    flags: int = 0
    mtu: int = 0
