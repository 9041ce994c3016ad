"""Block devices in an OCI spec (runtime-spec config-linux.md "Devices" and "Device allowlist").

``linux.devices`` lists the nodes the runtime creates in the container: each
has ``type`` (``c``, ``b``, ``u`` or ``p``), ``path`` (absolute, in the
container), ``major``/``minor`` (required for ``b`` and ``c``) and optional
``fileMode``/``uid``/``gid``.  containerd's CRI plugin fills it from
``ContainerConfig.devices`` (the host path's major:minor, the container path),
and ``ctr run --device`` the same way; both add a
``linux.resources.devices`` allow rule with the requested cgroup permissions
(``r``, ``w``, ``m``) after the spec's default deny-all.

Whether the container may write a device follows the allowlist as the device
cgroup applies it: the rules in order, a later matching rule overriding an
earlier one; a rule matches on ``type`` (``a`` or absent: any), ``major`` and
``minor`` (absent or -1: any); ``access`` absent means ``rwm``.  A device no rule
speaks about is writable (the spec restricts nothing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DeviceSpecError(ValueError):
    """``linux.devices`` or ``linux.resources.devices`` is malformed."""


@dataclass(frozen=True)
class BlockRequest:
    """One ``linux.devices`` entry of type ``b``: the container's path and the host's numbers."""

    container_path: str
    major: int
    minor: int
    read_only: bool  # the allowlist denies the container "w" on it


def _number(entry: dict[str, Any], key: str, where: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DeviceSpecError(f"{where}: {key} must be a non-negative integer, got {value!r}")
    return value


def _rule_matches(rule: dict[str, Any], major: int, minor: int) -> bool:
    if rule.get("type", "a") not in ("a", "b"):
        return False
    for key, value in (("major", major), ("minor", minor)):
        want = rule.get(key)
        if want is not None and want != -1 and want != value:
            return False
    return True


def writable(rules: Any, major: int, minor: int) -> bool:
    """Whether the allowlist ``rules`` (``linux.resources.devices``) lets the container write block ``major:minor``."""
    if rules is None:
        return True
    if not isinstance(rules, list):
        raise DeviceSpecError(f"linux.resources.devices must be a list, got {type(rules).__name__}")
    allowed: bool | None = None
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise DeviceSpecError(f"linux.resources.devices[{i}] must be an object, got {rule!r}")
        access = rule.get("access") or "rwm"
        if not isinstance(access, str):
            raise DeviceSpecError(f"linux.resources.devices[{i}].access must be a string, got {access!r}")
        if "w" in access and _rule_matches(rule, major, minor):
            allowed = bool(rule.get("allow", False))
    return True if allowed is None else allowed


def block_requests(spec: dict[str, Any]) -> list[BlockRequest]:
    """The type-``b`` entries of ``linux.devices``, in order; DeviceSpecError for a malformed one."""
    linux = spec.get("linux") or {}
    if not isinstance(linux, dict):
        raise DeviceSpecError("linux must be an object")
    devices = linux.get("devices") or []
    if not isinstance(devices, list):
        raise DeviceSpecError(f"linux.devices must be a list, got {type(devices).__name__}")
    rules = (linux.get("resources") or {}).get("devices")
    out: list[BlockRequest] = []
    seen: set[str] = set()
    for i, entry in enumerate(devices):
        where = f"linux.devices[{i}]"
        if not isinstance(entry, dict):
            raise DeviceSpecError(f"{where} must be an object, got {entry!r}")
        if entry.get("type") != "b":
            continue
        path = entry.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise DeviceSpecError(f"{where}: path must be an absolute container path, got {path!r}")
        if path in seen:
            raise DeviceSpecError(f"{where}: path {path} is listed twice")
        seen.add(path)
        major, minor = _number(entry, "major", where), _number(entry, "minor", where)
        out.append(BlockRequest(path, major, minor, read_only=not writable(rules, major, minor)))
    return out


#: the capability a privileged container's bounding set always has (containerd's ``WithPrivileged`` gives all)
_PRIVILEGED_CAP = "CAP_SYS_ADMIN"


def is_privileged(spec: dict[str, Any]) -> bool:
    """Whether ``spec`` is a privileged container's as containerd writes one (``ctr run --privileged``, CRI
    ``privileged: true``): CAP_SYS_ADMIN in the bounding set and a device-cgroup rule allowing every
    device (``{"allow": true, "access": "rwm"}``, no type, major or minor)."""
    linux, process = spec.get("linux"), spec.get("process")
    if not isinstance(linux, dict) or not isinstance(process, dict):
        return False
    caps = process.get("capabilities")
    bounding = caps.get("bounding") if isinstance(caps, dict) else None
    if not isinstance(bounding, list) or _PRIVILEGED_CAP not in bounding:
        return False
    resources = linux.get("resources")
    rules = resources.get("devices") if isinstance(resources, dict) else None
    if not isinstance(rules, list):
        return False
    return any(isinstance(r, dict) and r.get("allow") is True and r.get("type", "a") == "a"
               and r.get("major") in (None, -1) and r.get("minor") in (None, -1)
               and set(r.get("access") or "rwm") >= set("rwm") for r in rules)


def without_block_devices(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (copied) with no type-``b`` entry in ``linux.devices``: the guest must not create nodes with
    the host's numbers, which name the guest's own disks there."""
    import copy

    out = copy.deepcopy(spec)
    linux = out.get("linux")
    if isinstance(linux, dict) and isinstance(linux.get("devices"), list):
        linux["devices"] = [d for d in linux["devices"] if not (isinstance(d, dict) and d.get("type") == "b")]
    return out
