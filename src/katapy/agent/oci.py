"""Kata's protobuf ``grpc.Spec`` -> the OCI runtime-spec config.json the agent gives crun.

The JSON key of each field is its ``json_name`` in protos/katapy/pb/oci.proto
(the runtime-spec's own names), so the conversion walks descriptors instead
of listing fields.  Scalars equal to zero are absent (proto3 has no presence)
except where the runtime-spec makes a key mandatory; those are filled in by
:func:`spec_to_config`, which also checks what crun needs (runtime-spec
config.md: ``ociVersion``, ``root.path``, ``process.args``/``cwd``).
"""
from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

OCI_VERSION = "1.0.2"


class SpecError(ValueError):
    """The spec cannot be run (maps to INVALID_ARGUMENT)."""


def message_to_json(msg: Message) -> dict[str, Any]:
    """Every set field of ``msg`` under its json_name, recursively (maps become dicts)."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        out[field.json_name] = _value_to_json(field, value)
    return out


def _value_to_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                return {k: message_to_json(v) for k, v in value.items()}
            return dict(value)
        if field.is_repeated:
            return [message_to_json(v) for v in value]
        return message_to_json(value)
    if field.is_repeated:
        return list(value)
    return value


def process_to_json(process: Message) -> dict[str, Any]:
    """``grpc.Process`` -> runtime-spec ``process`` object, with the keys crun requires."""
    out = message_to_json(process)
    if not out.get("args"):
        raise SpecError("process.args must not be empty")
    out.setdefault("cwd", "/")
    if not str(out["cwd"]).startswith("/"):
        raise SpecError(f"process.cwd must be absolute, got {out['cwd']!r}")
    user = out.setdefault("user", {})
    user.setdefault("uid", 0)
    user.setdefault("gid", 0)
    out.setdefault("terminal", False)
    for rlimit in out.get("rlimits", []):
        rlimit.setdefault("hard", 0)
        rlimit.setdefault("soft", 0)
        if not rlimit.get("type"):
            raise SpecError("process.rlimits entry without a type")
    return out


def spec_to_config(spec: Message) -> dict[str, Any]:
    """``grpc.Spec`` -> config.json dict; raises :class:`SpecError` for a spec crun cannot run."""
    config = message_to_json(spec)
    config["ociVersion"] = config.get("ociVersion") or OCI_VERSION
    if not spec.HasField("Process"):
        raise SpecError("spec has no process")
    config["process"] = process_to_json(spec.Process)
    root = config.get("root", {})
    path = root.get("path", "")
    if not path.startswith("/"):
        raise SpecError(f"root.path must be an absolute guest path, got {path!r}")
    for mount in config.get("mounts", []):
        if not str(mount.get("destination", "")).startswith("/"):
            raise SpecError(f"mount destination must be absolute: {mount!r}")
    linux = config.setdefault("linux", {})
    for ns in linux.get("namespaces", []):
        if not ns.get("type"):
            raise SpecError("linux.namespaces entry without a type")
    _fill_resource_defaults(linux.get("resources", {}))
    # Windows/Solaris sections mean nothing on Linux; the host may still send them empty.
    config.pop("windows", None)
    config.pop("solaris", None)
    return config


def _fill_resource_defaults(resources: dict[str, Any]) -> None:
    """Keys the runtime-spec requires inside present objects (config-linux.md "Device allowlist")."""
    for device in resources.get("devices", []):
        device.setdefault("allow", False)
        if device.get("type", "a") not in ("a", "b", "c"):
            raise SpecError(f"linux.resources.devices type must be a, b or c: {device!r}")
