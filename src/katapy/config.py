"""katapy's configuration file: TOML, one file per hypervisor, as Kata ships them.

Where it comes from, first match wins:

1. an explicit path (``load(path)``, the shim's ``--config``);
2. the ``KATAPY_CONFIG`` environment variable;
3. ``<config dir>/configuration.toml`` (``/etc/katapy`` or ``KATAPY_CONFIG_DIR``),
   normally a symlink to ``configuration-builtin.toml`` or
   ``configuration-qemu.toml`` that ``katapy config use <name>`` switches;
4. nothing: the built-in defaults below.

Sections and keys (every key optional)::

    [hypervisor]  name path kernel initrd kernel_params default_vcpus default_memory
                  max_vcpus max_memory shared_fs debug_console seccomp
    [agent]       port log_port dial_timeout request_timeout
    [runtime]     log_level state_dir privileged_without_host_devices

Validation is strict: an unknown section or key, a value of the wrong type or
out of range, and a kernel or image file that does not exist are errors whose
message names the file, the key and the value.  Relative paths are taken
relative to the file's directory.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from katapy import paths

LOG_LEVELS = ("debug", "info", "warning", "error")
HYPERVISOR_NAMES = ("auto", "builtin", "qemu")
SHARED_FS = ("virtio-fs", "none")
MIN_MEMORY_MIB = 64


class ConfigError(ValueError):
    """The configuration is unusable; the message names the key and the value."""


def _default_qemu() -> Path:
    return Path(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")


@dataclass(frozen=True)
class HypervisorConfig:
    name: str = "auto"
    path: Path = field(default_factory=_default_qemu)  # the QEMU binary (qemu backend only)
    kernel: Path = field(default_factory=paths.guest_bzimage)
    initrd: Path = field(default_factory=paths.guest_initramfs)
    kernel_params: str = ""
    default_vcpus: int = 1
    default_memory: int = 256  # MiB
    max_vcpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_memory: int = 2048  # MiB
    shared_fs: str = "virtio-fs"
    debug_console: bool = False
    # per-thread seccomp filters of katapy's VMM threads (katapy.vmm.seccomp) and QEMU's -sandbox; set by hypervisor.select
    seccomp: bool = True


@dataclass(frozen=True)
class AgentConfig:
    port: int = 1024
    log_port: int = 1025
    dial_timeout: float = 60.0  # seconds
    request_timeout: float = 60.0  # seconds an agent request that sets up a sandbox or container may take


@dataclass(frozen=True)
class RuntimeConfig:
    log_level: str = "info"
    state_dir: Path = field(default_factory=paths.state_dir)
    # containerd's CRI key of the same name, which Kata asks users to set: a privileged container gets
    # the guest's devices, not every host block device hot-plugged into its VM
    privileged_without_host_devices: bool = True


@dataclass(frozen=True)
class KatapyConfig:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    source: Path | None = None  # the file read, None for built-in defaults


_SECTIONS: dict[str, type] = {"hypervisor": HypervisorConfig, "agent": AgentConfig, "runtime": RuntimeConfig}


def default_path() -> Path:
    return paths.config_dir() / "configuration.toml"


def find() -> Path | None:
    """The file ``load()`` reads with no explicit path, or None for defaults."""
    env = os.environ.get("KATAPY_CONFIG")
    if env:
        return Path(env)
    p = default_path()
    return p if p.exists() else None


def load(path: str | os.PathLike[str] | None = None, *, check_files: bool = True) -> KatapyConfig:
    """Read and validate the configuration (see the module docstring for where from).

    ``check_files=False`` skips the checks that the kernel, image and QEMU
    binary exist (``katapy config show`` reports them instead of failing).
    """
    src = Path(path) if path is not None else find()
    if src is None:
        cfg = KatapyConfig()
        validate(cfg, check_files=check_files)
        return cfg
    try:
        raw = tomllib.loads(src.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{src}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{src}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: not valid TOML: {exc}") from None
    return from_dict(raw, source=src, check_files=check_files)


def from_dict(raw: dict[str, Any], source: Path | None = None, *, check_files: bool = True) -> KatapyConfig:
    """Build a validated config from parsed TOML (``source`` names it in errors, anchors relative paths)."""
    where = str(source) if source else "configuration"
    base = source.resolve().parent if source else Path.cwd()
    sections: dict[str, Any] = {}
    for sect, value in raw.items():
        cls = _SECTIONS.get(sect)
        if cls is None:
            raise ConfigError(f"{where}: unknown section [{sect}] (known: {', '.join(_SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {sect} = {value!r}: expected a [{sect}] table")
        sections[sect] = _build_section(where, sect, cls, value, base)
    cfg = KatapyConfig(**sections, source=source)
    validate(cfg, check_files=check_files, where=where)
    return cfg


def _build_section(where: str, sect: str, cls: type, values: dict[str, Any], base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key [{sect}] {key} = {value!r} (known: {', '.join(sorted(known))})")
        kwargs[key] = _convert(f"{where}: [{sect}] {key} = {value!r}", hints[key], value, base)
    return cls(**kwargs)


def _convert(label: str, want: Any, value: Any, base: Path) -> Any:
    if want is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label}: expected true or false")
        return value
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label}: expected an integer")
        return value
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label}: expected a number")
        return float(value)
    if want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label}: expected a string")
        return value
    if want is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{label}: expected a path string")
        p = Path(value)
        return p if p.is_absolute() else base / p
    raise AssertionError(f"no converter for {want!r}")  # a field type this module forgot


def validate(cfg: KatapyConfig, *, check_files: bool = True, where: str | None = None) -> None:
    """Check ranges and cross-key rules; raise ConfigError naming the key and value."""
    w = where or (str(cfg.source) if cfg.source else "configuration")
    hv, agent, rt = cfg.hypervisor, cfg.agent, cfg.runtime

    def bad(sect: str, key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{w}: [{sect}] {key} = {value!r}: {why}")

    if hv.name not in HYPERVISOR_NAMES:
        raise bad("hypervisor", "name", hv.name, f"must be one of {', '.join(HYPERVISOR_NAMES)}")
    if hv.shared_fs not in SHARED_FS:
        raise bad("hypervisor", "shared_fs", hv.shared_fs, f"must be one of {', '.join(SHARED_FS)}")
    if hv.max_vcpus < 1 or hv.max_vcpus > 255:
        raise bad("hypervisor", "max_vcpus", hv.max_vcpus, "must be in 1..255")
    if hv.default_vcpus < 1:
        raise bad("hypervisor", "default_vcpus", hv.default_vcpus, "must be at least 1")
    if hv.default_vcpus > hv.max_vcpus:
        raise bad("hypervisor", "default_vcpus", hv.default_vcpus, f"greater than max_vcpus = {hv.max_vcpus}")
    if hv.default_memory < MIN_MEMORY_MIB:
        raise bad("hypervisor", "default_memory", hv.default_memory, f"must be at least {MIN_MEMORY_MIB} (MiB)")
    if hv.default_memory > hv.max_memory:
        raise bad("hypervisor", "default_memory", hv.default_memory, f"greater than max_memory = {hv.max_memory}")
    for key in ("kernel_params",):
        if "\n" in getattr(hv, key):
            raise bad("hypervisor", key, getattr(hv, key), "must be one line")
    for key in ("port", "log_port"):
        v = getattr(agent, key)
        if not 0 < v < 1 << 32:
            raise bad("agent", key, v, "must be a vsock port in 1..4294967295")
    if agent.port == agent.log_port:
        raise bad("agent", "log_port", agent.log_port, "must differ from port")
    if not agent.dial_timeout > 0:
        raise bad("agent", "dial_timeout", agent.dial_timeout, "must be a positive number of seconds")
    if not agent.request_timeout > 0:
        raise bad("agent", "request_timeout", agent.request_timeout, "must be a positive number of seconds")
    if rt.log_level not in LOG_LEVELS:
        raise bad("runtime", "log_level", rt.log_level, f"must be one of {', '.join(LOG_LEVELS)}")
    if not rt.state_dir.is_absolute():
        raise bad("runtime", "state_dir", str(rt.state_dir), "must be an absolute path")
    if check_files:
        for problem in file_problems(cfg, where=w):
            raise ConfigError(problem)


def file_problems(cfg: KatapyConfig, where: str | None = None) -> list[str]:
    """Missing kernel, image or QEMU binary, as messages (empty when all is there)."""
    w = where or (str(cfg.source) if cfg.source else "configuration")
    hv = cfg.hypervisor
    out = []
    for key in ("kernel", "initrd"):
        p = getattr(hv, key)
        if not p.is_file():
            out.append(f"{w}: [hypervisor] {key} = {str(p)!r}: no such file (build it with `make kernel image`)")
    if hv.name == "qemu" and not os.access(hv.path, os.X_OK):
        out.append(f"{w}: [hypervisor] path = {str(hv.path)!r}: not an executable QEMU binary")
    return out


def to_toml(cfg: KatapyConfig) -> str:
    """The effective configuration as TOML (every key, defaults included)."""
    lines: list[str] = []
    for sect in _SECTIONS:
        lines.append(f"[{sect}]")
        obj = getattr(cfg, sect)
        for f in dataclasses.fields(obj):
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c)
                         for c in str(v)) + '"'


#: What a TOML basic string must escape besides the control characters (TOML 1.0, "String").
_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
