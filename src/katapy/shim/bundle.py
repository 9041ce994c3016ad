"""Reading an OCI bundle (runtime-spec bundle.md, config.md) and its CRI grouping annotations.

containerd writes ``<bundle>/config.json``; CRI marks pod members with
``io.kubernetes.cri.container-type`` ("sandbox" | "container") and
``io.kubernetes.cri.sandbox-id`` (containerd ``pkg/cri/annotations``).  A
container without them is its own sandbox.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from katapy.shim.errors import InvalidArgument

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"  # containerd pkg/cri/annotations (1.6): the pod's name
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
RUNC_GROUP = "io.containerd.runc.v2.group"
MAX_CONFIG_BYTES = 16 << 20


def load_spec(bundle: Path) -> dict[str, Any]:
    """The bundle's config.json as a dict, with its basic shape checked."""
    path = Path(bundle) / "config.json"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InvalidArgument(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: bundle has no config.json") from None
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read: {exc.strerror}") from None
    try:
        spec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path}: invalid config.json: {exc}") from None
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{path}: invalid config.json: top level is {type(spec).__name__}, not an object")
    check_spec(spec, str(path))
    return spec


def check_spec(spec: dict[str, Any], where: str) -> None:
    """The parts of the spec katapy relies on (config.md "Process", "Root", "Annotations")."""
    process = spec.get("process")
    if not isinstance(process, dict):
        raise InvalidArgument(f"{where}: invalid config.json: process is missing or not an object")
    check_process(process, where)
    root = spec.get("root")
    if root is not None and (not isinstance(root, dict) or not isinstance(root.get("path", ""), str)):
        raise InvalidArgument(f"{where}: invalid config.json: root must be an object with a string path")
    ann = spec.get("annotations", {})
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise InvalidArgument(f"{where}: invalid config.json: annotations must map strings to strings")


def check_process(process: dict[str, Any], where: str) -> None:
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument(f"{where}: invalid process: args must be a non-empty list of strings")
    env = process.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise InvalidArgument(f"{where}: invalid process: env must be a list of strings")
    cwd = process.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidArgument(f"{where}: invalid process: cwd {cwd!r} must be an absolute path")
    if not isinstance(process.get("terminal", False), bool):
        raise InvalidArgument(f"{where}: invalid process: terminal must be a boolean")


def annotations(spec: dict[str, Any]) -> dict[str, str]:
    ann = spec.get("annotations") or {}
    return ann if isinstance(ann, dict) else {}


def sandbox_id(spec: dict[str, Any], container_id: str) -> str:
    """The sandbox (pod) a container belongs to; itself when it is a sandbox or ungrouped."""
    ann = annotations(spec)
    if ann.get(CONTAINER_TYPE) == "container" and ann.get(SANDBOX_ID):
        return ann[SANDBOX_ID]
    if ann.get(CONTAINER_TYPE) == "sandbox":
        return container_id
    return ann.get(RUNC_GROUP) or container_id


def is_pod_member(spec: dict[str, Any]) -> bool:
    """True for a CRI workload container that joins an existing sandbox VM."""
    return annotations(spec).get(CONTAINER_TYPE) == "container"
