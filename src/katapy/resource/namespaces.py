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
* an entry whose path names the host's own namespace of that type (the shim's;
  CRI's ``hostPID`` pods join ``/proc/<pause>/ns/pid`` of a pause container in the
  host PID namespace): removed, so the container shares the VM's namespace -- in
  a VM, "the node's" namespace is the VM's, as in Kata.
* any other entry with a path (``pid`` of a shared-PID pod, ``mount``, ...):
  the path is dropped and the container gets a new namespace of that type
  (sharing one PID namespace between a pod's containers is not supported yet).
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


def amend_for_guest(guest_spec: dict[str, Any], pod_member: bool) -> None:
    """Rewrite ``guest_spec['linux']['namespaces']`` (in place) for the guest; see the module doc."""
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
        if path and is_host_namespace(str(kind), str(path)):
            continue
        if path:
            log.get("resource.namespaces").info("host namespace path dropped; new namespace in the guest",
                                                type=kind, path=path)
            ns = {k: v for k, v in ns.items() if k != "path"}
        kept.append(ns)
    linux["namespaces"] = kept
