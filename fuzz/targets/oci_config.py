"""Target ``oci_config``: OCI bundle specs, katapy annotations and the configuration TOML.

Fuzzed, through the real readers: ``katapy.shim.bundle.load_spec`` on a
config.json that is raw bytes or JSON with wrong types in ``process``,
``root`` and ``annotations``; ``katapy.shim.annotations.sandbox_sizing`` on
the spec's annotations (vCPU and memory counts, kernel parameters, the CRI
sizing annotations, unknown ``io.katapy.`` keys); ``katapy.config.load`` on a
configuration.toml that is raw bytes or sections with values of every type.

Clean errors: InvalidArgument (and its AnnotationError) from the shim's
readers, ConfigError from the configuration.  Checked: a configuration that
loads survives ``to_toml`` and loads back equal.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from fuzz.common import Input
from katapy import config
from katapy.shim import annotations as ann
from katapy.shim import bundle
from katapy.shim.errors import InvalidArgument

_KEYS = ann.KNOWN + (ann.CRI_CPU_QUOTA, ann.CRI_CPU_PERIOD, ann.CRI_MEMORY, "io.katapy.unknown",
                     "io.kubernetes.cri.container-type", "other")
_WORDS = ("1", "0", "-1", "4", "65536", "268435456", "1e3", "0x10", " 2", "console=ttyS0", "init=/bin/sh",
          "quiet\n", "", "a" * 300, "9" * 40, "\u00e9")
_SECTIONS = {"hypervisor": [f.name for f in dataclasses.fields(config.HypervisorConfig)],
             "agent": [f.name for f in dataclasses.fields(config.AgentConfig)],
             "runtime": [f.name for f in dataclasses.fields(config.RuntimeConfig)], "nosuch": ["x"]}
_dir: list[str] = []


def _value(inp: Input, depth: int = 0) -> object:
    kind = inp.u8() % (9 if depth < 2 else 6)
    if kind == 0:
        return inp.pick(_WORDS)
    if kind == 1:
        return inp.interesting_int(8) - (1 << 63 if inp.one_in(4) else 0)
    if kind == 2:
        return bool(inp.u8() & 1)
    if kind == 3:
        return inp.pick((0.5, -1.0, 1e308, float("nan")))
    if kind == 4:
        return None
    if kind == 5:
        return inp.blob(12).decode("latin-1")
    if kind == 6:
        return [_value(inp, depth + 1) for _ in range(inp.u8() % 3)]
    return {inp.pick(("path", "args", "x")): _value(inp, depth + 1) for _ in range(inp.u8() % 3)}


def _spec(inp: Input) -> bytes:
    if inp.one_in(8):
        return inp.take(inp.remaining() // 2)
    process = {"args": [inp.pick(_WORDS)] if not inp.one_in(8) else _value(inp),
               "cwd": inp.pick(("/", "/work", "rel", "")) if not inp.one_in(8) else _value(inp)}
    if inp.one_in(4):
        process[inp.pick(("env", "terminal"))] = _value(inp)
    spec: dict[str, object] = {"process": process if not inp.one_in(16) else _value(inp)}
    if inp.one_in(4):
        spec["root"] = {"path": inp.pick(("rootfs", "/r"))} if inp.one_in(2) else _value(inp)
    annotations: dict[str, object] = {inp.pick(_KEYS): inp.pick(_WORDS) for _ in range(inp.u8() % 5)}
    if inp.one_in(16):
        annotations["x"] = _value(inp)
    spec["annotations"] = annotations
    return json.dumps(spec).encode()


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return '""'
    if isinstance(v, float):
        return "nan" if v != v else repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _toml(inp: Input) -> bytes:
    if inp.one_in(8):
        return inp.take(inp.remaining())
    lines = []
    for _ in range(inp.u8() % 4):
        section = inp.pick(tuple(_SECTIONS))
        lines.append(f"[{section}]")
        for _ in range(inp.u8() % 4):
            lines.append(f"{inp.pick(_SECTIONS[section])} = {_toml_value(_value(inp))}")
    return "\n".join(lines).encode()


def _workdir() -> str:
    if not _dir:
        _dir.append(tempfile.mkdtemp(prefix="katapy-fuzz-oci-"))
    return _dir[0]


def fuzz_one(data: bytes) -> None:
    inp = Input(data)
    d = _workdir()
    spec_raw, toml_raw = _spec(inp), _toml(inp)
    with open(os.path.join(d, "config.json"), "wb") as f:
        f.write(spec_raw)
    toml_path = os.path.join(d, "configuration.toml")
    with open(toml_path, "wb") as f:
        f.write(toml_raw)
    try:
        cfg = config.load(toml_path, check_files=False)
    except config.ConfigError:
        cfg = config.KatapyConfig()
    else:
        again = os.path.join(d, "again.toml")
        with open(again, "w") as f:
            f.write(config.to_toml(cfg))
        back = config.load(again, check_files=False)
        assert dataclasses.replace(back, source=None) == dataclasses.replace(cfg, source=None), \
            "configuration changed through to_toml"
    try:
        spec = bundle.load_spec(Path(d))
        bundle.sandbox_id(spec, "c1")
        ann.sandbox_sizing(bundle.annotations(spec), cfg.hypervisor)
    except InvalidArgument:
        pass
