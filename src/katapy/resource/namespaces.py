"""A container's Linux namespaces as the guest must see them (runtime-spec config-linux.md "Namespaces").

The host's spec names namespaces by host paths: CRI's sandbox netns
(``/var/run/netns/cni-...``) and, for app containers, the pause container's
``/proc/<pid>/ns/{ipc,uts,pid}``.  Those paths mean nothing inside the VM, so
(as Kata's runtime and agent do) the spec crun gets in the guest is amended:

* ``network`` with a path: removed.  The pod's network was carried into the VM
  (katapy.resource.network), so the VM's own netns *is* the pod netns.  A
  ``network`` entry without a path (``ctr run`` without ``--net-host``) stays:
  the container gets its own empty netns, as runc would give it.
* ``ipc`` and ``uts`` of a CRI pod member (sandbox or app container): removed,
  so every container of the pod shares the VM's IPC and UTS namespaces (the VM
  is the pod; the agent set its hostname in CreateSandbox).  ``hostname`` goes
  with ``uts``: crun only sets it in a private UTS namespace.
* ``pid`` of a CRI app container names the sandbox's PID namespace by the task
  pid katapy reported for the sandbox -- the VMM's, in the host PID namespace --
  so the path cannot tell a hostPID pod from a shareProcessNamespace pod; the
  sandbox (pause) container's spec can: without a ``pid`` entry (hostPID) the
  entry is removed and the container shares the VM's PID namespace ("the
  node's" is the VM's, as in Kata; the agent is its PID 1); with one, the path
  is dropped and the container gets its own PID namespace (sharing one PID
  namespace among a pod's containers is not supported yet: isolation from the
  agent is kept rather than sharing).
* any other entry whose path names the host's own namespace of that type (the
  shim's, e.g. ``ctr run --with-ns``): removed, the VM's is the host's.
* any other entry with a path: the path is dropped and the container gets a new
  namespace of that type.
"""
from __future__ import annotations

import os
from typing import Any

from katapy import log

POD_SHARED = ("ipc", "uts")
# runtime-spec namespace type -> /proc/<pid>/ns/ entry (namespaces(7))
PROC_NS = {"pid": "pid", "network": "net", "mount": "mnt", "ipc": "ipc", "uts": "uts", "user": "user",
           "cgroup": "cgroup", "time": "time"}


def is_host_namespace(kind: str, path: str, host_pid: str = "self") -> bool:
    """True when ``path`` is the same namespace as ``/proc/<host_pid>/ns/<kind>`` (same dev and inode)."""
    name = PROC_NS.get(kind)
    if name is None:
        return False
    try:
        a, b = os.stat(path), os.stat(f"/proc/{host_pid}/ns/{name}")
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def has_namespace(spec: dict[str, Any], kind: str) -> bool:
    """True when the spec lists a namespace of type ``kind`` (with or without a path)."""
    linux = spec.get("linux")
    entries = linux.get("namespaces") if isinstance(linux, dict) else None
    return isinstance(entries, list) and any(isinstance(n, dict) and n.get("type") == kind for n in entries)


def amend_for_guest(guest_spec: dict[str, Any], pod_member: bool, sandbox_has_pid_ns: bool = True) -> None:
    """Rewrite ``guest_spec['linux']['namespaces']`` (in place) for the guest; see the module doc.

    ``sandbox_has_pid_ns``: whether the pod's sandbox container has its own PID namespace
    (False for a hostPID pod)."""
    linux = guest_spec.get("linux")
    if not isinstance(linux, dict) or not isinstance(linux.get("namespaces"), list):
        return
    kept: list[dict[str, Any]] = []
    for ns in linux["namespaces"]:
        if not isinstance(ns, dict):
            continue
        kind, path = ns.get("type"), ns.get("path")
        if kind == "network" and path:
            continue
        if pod_member and kind in POD_SHARED:
            if kind == "uts":
                guest_spec.pop("hostname", None)
            continue
        if pod_member and kind == "pid" and path and not sandbox_has_pid_ns:
            continue
        if path and not (pod_member and kind == "pid") and is_host_namespace(str(kind), str(path)):
            continue
        if path:
            log.get("resource.namespaces").info("host namespace path dropped; new namespace in the guest",
                                                type=kind, path=path)
            ns = {k: v for k, v in ns.items() if k != "path"}
        kept.append(ns)
    linux["namespaces"] = kept
