"""A container's Linux namespaces as the guest must see them (runtime-spec config-linux.md "Namespaces").

The host's spec names namespaces by host paths: CRI's sandbox netns
(``/var/run/netns/cni-...``) and, for app containers, the pause container's
``/proc/<pid>/ns/{ipc,uts,pid}``.  Those paths mean nothing inside the VM, so
(as Kata's runtime and agent do) the spec crun gets in the guest is amended:

* ``network`` with a path: removed.  The pod's network was carried into the VM
  (katapy.resource.network), so the VM's own netns *is* the pod netns.  A
  ``network`` entry without a path (``ctr run`` without ``--net-host``) stays:
  the container gets its own empty netns, as runc would give it.
* The pod's IPC and UTS namespaces are the sandbox (pause) container's, as with
  runc: the sandbox container keeps its new ``ipc`` and ``uts`` namespaces (and
  its hostname), and every app container's ``ipc``/``uts`` entry becomes a
  join of the sandbox container's: path ``container:<sandbox id>``, which the
  agent resolves to ``/proc/<guest pid of its init>/ns/<type>``
  (katapy.agent.namespaces).  So IPC sysctls of the pod (``kernel.shm*``,
  ``fs.mqueue.*``) apply to a real IPC namespace of the pod, and System V IPC
  and POSIX message queues are shared by the pod's containers and no one else.
* ``pid`` of a CRI app container names the sandbox's PID namespace by the task
  pid katapy reported for the sandbox -- the VMM's, in the host PID namespace.
  The sandbox container's spec tells the cases apart: without a ``pid`` entry
  (hostPID pod) the entry is removed and the container shares the VM's PID
  namespace ("the node's" is the VM's, as in Kata; the agent is its PID 1);
  with one, the app container joins it (``container:<sandbox id>``:
  shareProcessNamespace, the pause process is PID 1 of the pod's namespace).
  An app container's ``pid`` entry without a path is its own PID namespace.
* any other entry whose path names the host's own namespace of that type (the
  shim's, e.g. ``ctr run --with-ns``): removed, the VM's is the host's.
* any other entry with a path: the path is dropped and the container gets a new
  namespace of that type.

What a VM cannot give is refused before anything starts
(:func:`check_pod_sandbox`): a CRI pod sandbox without its own network
namespace (hostNetwork) or IPC namespace (hostIPC) would need the node's
namespaces inside the VM.
"""
from __future__ import annotations

import os
from typing import Any

from katapy import log

# joined from the sandbox container by every app container of a CRI pod
POD_SHARED = ("ipc", "uts")
# a namespace path the agent resolves: join that container's namespace (katapy.agent.namespaces)
JOIN_PREFIX = "container:"
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


class NamespaceError(ValueError):
    """The container asks for namespaces a pod VM cannot give."""


def check_pod_sandbox(spec: dict[str, Any]) -> None:
    """Refuse a CRI pod sandbox in the node's network or IPC namespace (hostNetwork, hostIPC).

    containerd leaves the ``network``/``ipc`` entry out of the sandbox spec for
    NamespaceMode NODE.  The VM has its own kernel: the node's interfaces, ports
    and System V/POSIX IPC objects cannot be in it, and running the pod in the
    VM's namespaces instead would silently be something else (Kata refuses host
    networking for the same reason)."""
    for kind, field, what in (("network", "hostNetwork", "the node's network (its interfaces and ports)"),
                              ("ipc", "hostIPC", "the node's IPC namespace (its shared memory and queues)")):
        if not has_namespace(spec, kind):
            raise NamespaceError(f"{field} pods are not supported by katapy: the pod runs in its own VM, which "
                                 f"cannot share {what}; run it with a runc RuntimeClass or without {field}")


def amend_for_guest(guest_spec: dict[str, Any], pod_member: bool, sandbox_has_pid_ns: bool = True,
                    sandbox_id: str = "") -> None:
    """Rewrite ``guest_spec['linux']['namespaces']`` (in place) for the guest; see the module doc.

    ``pod_member``: a CRI app container of the pod whose sandbox container is
    ``sandbox_id``; ``sandbox_has_pid_ns``: whether that sandbox container has
    its own PID namespace (False for a hostPID pod)."""
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
        if pod_member and path and (kind in POD_SHARED or (kind == "pid" and sandbox_has_pid_ns)):
            if not sandbox_id:
                raise NamespaceError(f"{kind} namespace of a pod container without a sandbox id")
            kept.append({"type": kind, "path": JOIN_PREFIX + sandbox_id})
            continue
        if pod_member and kind == "pid" and path:
            continue  # hostPID pod: the VM's PID namespace
        if path and is_host_namespace(str(kind), str(path)):
            continue
        if path:
            log.get("resource.namespaces").info("host namespace path dropped; new namespace in the guest",
                                                type=kind, path=path)
            ns = {k: v for k, v in ns.items() if k != "path"}
        kept.append(ns)
    linux["namespaces"] = kept
