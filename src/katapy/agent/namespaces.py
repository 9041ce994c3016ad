"""A container's namespaces in the guest: joins of another container's, and sysctls of the VM's own netns.

The shim names the pod's shared namespaces without host paths (it cannot know
guest pids): an entry ``{"type": "ipc", "path": "container:<id>"}`` means "the
IPC namespace of container <id>'s init process" (katapy.resource.namespaces
on the host writes them for a CRI pod's app containers).  :func:`resolve_joins`
turns each into ``/proc/<guest pid>/ns/<name>`` (namespaces(7)) before crun
sees the spec; the named container must exist and its init must be alive.

Sysctls (runtime-spec config-linux.md "Sysctl") are applied by crun inside the
namespaces it creates, and crun refuses ``net.*`` keys for a container without
a new network namespace.  A container with no ``network`` entry runs in the
VM's network namespace -- for a CRI pod that *is* the pod's network namespace
(the pod's veth was carried into the VM), so the pod's ``net.*`` sysctls belong
there: :func:`apply_vm_netns_sysctls` writes them to /proc/sys/net itself and
takes them out of the spec.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from katapy.agent import log
from katapy.ttrpc.errors import FailedPrecondition, Internal, InvalidArgument

JOIN_PREFIX = "container:"
# runtime-spec namespace type -> /proc/<pid>/ns/ entry
PROC_NS = {"pid": "pid", "network": "net", "mount": "mnt", "ipc": "ipc", "uts": "uts", "user": "user",
           "cgroup": "cgroup", "time": "time"}
_SYSCTL_KEY = re.compile(r"^[A-Za-z0-9_-]+([./][A-Za-z0-9_:-]+)*$")


def _entries(config: dict[str, Any]) -> list[dict[str, Any]]:
    linux = config.get("linux")
    ns = linux.get("namespaces") if isinstance(linux, dict) else None
    return [n for n in ns if isinstance(n, dict)] if isinstance(ns, list) else []


def resolve_joins(config: dict[str, Any], init_pid_of: Callable[[str], int | None]) -> None:
    """Replace every ``container:<id>`` namespace path (in place).

    ``init_pid_of(id)`` gives the guest pid of that container's init process,
    None when it has exited; an unknown id raises NotFound from the caller."""
    for ns in _entries(config):
        path = ns.get("path")
        if not isinstance(path, str) or not path.startswith(JOIN_PREFIX):
            continue
        kind = ns.get("type")
        name = PROC_NS.get(str(kind))
        if name is None:
            raise InvalidArgument(f"cannot join a namespace of type {kind!r}")
        other = path[len(JOIN_PREFIX):]
        pid = init_pid_of(other)
        if pid is None:
            raise FailedPrecondition(f"cannot join the {kind} namespace of container {other}: its init has exited")
        target = f"/proc/{pid}/ns/{name}"
        if not os.path.exists(target):
            raise FailedPrecondition(f"cannot join the {kind} namespace of container {other}: {target} is gone")
        ns["path"] = target


def sysctl_path(key: str, proc_sys: str = "/proc/sys") -> str:
    """The file of a sysctl key under ``proc_sys`` (sysctl(8): dots, or slashes, separate the components)."""
    if not _SYSCTL_KEY.match(key) or ".." in key:
        raise InvalidArgument(f"invalid sysctl key {key!r}")
    parts = key.split("/") if "/" in key else key.split(".")
    return os.path.join(proc_sys, *parts)


def apply_vm_netns_sysctls(config: dict[str, Any], proc_sys: str = "/proc/sys") -> dict[str, str]:
    """Write the ``net.*`` sysctls of a container in the VM's network namespace; returns what was applied."""
    linux = config.get("linux")
    sysctls = linux.get("sysctl") if isinstance(linux, dict) else None
    if not isinstance(sysctls, dict) or any(n.get("type") == "network" for n in _entries(config)):
        return {}
    applied: dict[str, str] = {}
    for key in [k for k in sysctls if isinstance(k, str) and (k.startswith("net.") or k.startswith("net/"))]:
        value = sysctls[key]
        if not isinstance(value, str) or "\n" in value or len(value) > 4096:
            raise InvalidArgument(f"invalid value for sysctl {key}")
        path = sysctl_path(key, proc_sys)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # never O_CREAT: only keys the kernel has
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise InvalidArgument(f"sysctl {key}: no such key in the guest kernel ({path})") from None
        except OSError as exc:
            raise Internal(f"sysctl {key}={value!r}: {exc.strerror}") from None
        applied[key] = value
        del sysctls[key]
    if applied:
        log.info("net sysctls applied to the VM's network namespace (the pod's)", sysctls=applied)
    return applied
