"""OCI runtime-spec JSON (config.json, Process, LinuxResources dicts) -> Kata's protobuf ``grpc.Spec``.

The JSON key of each field is its ``json_name`` in protos/katapy/pb/oci.proto,
so the conversion walks descriptors.  Keys the Kata protocol has no field for
(for example ``process.ioPriority``, ``linux.personality``) cannot be carried;
they are dropped and returned so the caller can log them.  A value of the
wrong JSON type raises :class:`OciSpecError`.
"""
from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from katapy.pb import oci_pb2

_INTS = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
}


class OciSpecError(ValueError):
    """The JSON does not fit the OCI schema katapy carries."""


def json_to_message(data: Any, msg: Message, path: str = "", dropped: list[str] | None = None) -> list[str]:
    """Fill ``msg`` from the JSON object ``data``; the dotted paths of keys that were dropped."""
    dropped = [] if dropped is None else dropped
    if not isinstance(data, dict):
        raise OciSpecError(f"{path or 'spec'}: expected an object, got {type(data).__name__}")
    by_json = {f.json_name: f for f in msg.DESCRIPTOR.fields}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        field = by_json.get(key)
        if field is None:
            dropped.append(where)
            continue
        if value is None:
            continue
        _set_field(msg, field, value, where, dropped)
    return dropped


def _set_field(msg: Message, field: FieldDescriptor, value: Any, where: str, dropped: list[str]) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        if not isinstance(value, dict):
            raise OciSpecError(f"{where}: expected an object")
        target = getattr(msg, field.name)
        for k, v in value.items():
            target[str(k)] = _scalar(field.message_type.fields_by_name["value"], v, f"{where}.{k}")
        return
    if field.is_repeated:
        if not isinstance(value, list):
            raise OciSpecError(f"{where}: expected a list, got {type(value).__name__}")
        target = getattr(msg, field.name)
        for i, item in enumerate(value):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                json_to_message(item, target.add(), f"{where}[{i}]", dropped)
            else:
                target.append(_scalar(field, item, f"{where}[{i}]"))
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        json_to_message(value, getattr(msg, field.name), where, dropped)
        getattr(msg, field.name).SetInParent()
        return
    setattr(msg, field.name, _scalar(field, value, where))


def _scalar(field: FieldDescriptor, value: Any, where: str) -> Any:
    if field.type in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OciSpecError(f"{where}: expected an integer, got {value!r}")
        unsigned = field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64)
        bits = 32 if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32) else 64
        low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if not low <= value <= high:
            raise OciSpecError(f"{where}: {value} out of range")
        return value
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise OciSpecError(f"{where}: expected a boolean, got {value!r}")
        return value
    if field.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise OciSpecError(f"{where}: expected a string, got {value!r}")
        return value
    raise OciSpecError(f"{where}: unsupported field type {field.type}")


def spec_from_json(config: dict[str, Any]) -> tuple[oci_pb2.Spec, list[str]]:
    """config.json dict -> (grpc.Spec, dropped key paths)."""
    spec = oci_pb2.Spec()
    dropped = json_to_message(config, spec)
    return spec, dropped


def process_from_json(process: dict[str, Any]) -> tuple[oci_pb2.Process, list[str]]:
    msg = oci_pb2.Process()
    dropped = json_to_message(process, msg, "process")
    return msg, dropped


def resources_from_json(resources: dict[str, Any]) -> tuple[oci_pb2.LinuxResources, list[str]]:
    msg = oci_pb2.LinuxResources()
    dropped = json_to_message(resources, msg, "resources")
    return msg, dropped
