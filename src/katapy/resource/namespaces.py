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
* any other entry with a path (``pid`` of a shared-PID pod, ``mount``, ...):
  the path is dropped and the container gets a new namespace of that type.
"""
from __future__ import annotations

from typing import Any

from katapy import log

POD_SHARED = ("ipc", "uts")


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
        if path:
            log.get("resource.namespaces").info("host namespace path dropped; new namespace in the guest",
                                                type=kind, path=path)
            ns = {k: v for k, v in ns.items() if k != "path"}
        kept.append(ns)
    linux["namespaces"] = kept
