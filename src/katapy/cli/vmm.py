"""`katapy vmm --config vm.toml|vm.json`: boot a kernel with the built-in VMM, console on stdout.

Configuration keys: ``kernel`` (path), ``initrd`` (path, optional), ``cmdline``,
``vcpus`` (default 1), ``mem_mib`` (default 256), ``max_vcpus`` and ``max_mem_mib`` (what the VM may
grow to by hotplug: the MP table and CPUID list ``max_vcpus``; default: no growth), ``protocol`` ("linux64" | "pvh"),
``irqchip`` ("split" | "kernel": where the PIC and I/O APIC live, see katapy.vmm.config.IrqChip),
and an optional ``devices`` list of tables, each with ``type`` and its arguments:
vsock (guest_cid, uds_path), fs (tag, shared_dir), blk (path, read_only), net (tap_name, mac).
Input on stdin goes to the guest's serial port.  Exits 0 when the guest powers off or
reboots, 1 on a VM error, 2 on a configuration error.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import tomllib
from pathlib import Path

from katapy import log
from katapy.vmm.api import Vmm
from katapy.vmm.boot.loader import BootProtocol
from katapy.vmm.config import ConfigError, IrqChip, MachineConfig
from katapy.vmm.state import ExitReason

DEVICE_CLASSES = {
    "vsock": ("katapy.vmm.virtio.vsock", "VsockDevice"),
    "fs": ("katapy.vmm.virtio.fs", "FsDevice"),
    "blk": ("katapy.vmm.virtio.blk", "BlockDevice"),
    "net": ("katapy.vmm.virtio.net", "NetDevice"),
}


def load_config(path: Path) -> dict:
    text = path.read_bytes()
    if path.suffix == ".json":
        return json.loads(text)
    return tomllib.loads(text.decode())


def make_device(spec: dict):
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in DEVICE_CLASSES:
        raise ConfigError(f"device type {kind!r}: expected one of {sorted(DEVICE_CLASSES)}")
    module, cls = DEVICE_CLASSES[kind]
    try:
        return getattr(importlib.import_module(module), cls)(**spec)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"device type {kind!r} is not available in this build: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"device {kind!r}: {exc}") from exc


def configure(vmm: Vmm, cfg: dict) -> None:
    unknown = set(cfg) - {"kernel", "initrd", "cmdline", "vcpus", "mem_mib", "max_vcpus", "max_mem_mib", "protocol",
                        "irqchip", "devices"}
    if unknown:
        raise ConfigError(f"unknown configuration keys: {sorted(unknown)}")
    if "kernel" not in cfg:
        raise ConfigError("'kernel' is required")
    chips = {c.value: c for c in IrqChip}
    if cfg.get("irqchip", MachineConfig.irqchip.value) not in chips:
        raise ConfigError(f"irqchip {cfg['irqchip']!r}: expected one of {sorted(chips)}")
    maxima = {k: int(cfg[k]) for k in ("max_vcpus", "max_mem_mib") if k in cfg}
    vmm.configure_machine(int(cfg.get("vcpus", 1)), int(cfg.get("mem_mib", 256)),
                          chips[cfg.get("irqchip", MachineConfig.irqchip.value)], **maxima)
    try:
        protocol = BootProtocol(cfg.get("protocol", "linux64"))
    except ValueError as exc:
        raise ConfigError(f"protocol must be 'linux64' or 'pvh': {exc}") from exc
    vmm.set_boot_source(cfg["kernel"], cfg.get("initrd"), cfg.get("cmdline", "console=ttyS0"), protocol)
    for spec in cfg.get("devices", []):
        vmm.add_device(make_device(spec))


def _forward_stdin(vmm: Vmm) -> None:
    fd = sys.stdin.fileno()
    while True:
        try:
            data = os.read(fd, 1024)
        except OSError:
            return
        if not data:
            return
        vmm.serial_input(data)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="katapy vmm", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path, help="vm.toml or vm.json")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    log.configure(args.log_level)
    vmm = Vmm()
    try:
        configure(vmm, load_config(args.config))
    except (ConfigError, OSError, ValueError) as exc:
        print(f"katapy vmm: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer

    def console(data: bytes) -> None:
        out.write(data)
        out.flush()

    vmm.add_serial_output(console)
    try:
        vmm.start()
        threading.Thread(target=_forward_stdin, args=(vmm,), daemon=True).start()
        ex = vmm.wait()
    except KeyboardInterrupt:
        ex = None
    except Exception as exc:
        print(f"katapy vmm: {exc}", file=sys.stderr)
        vmm.stop()
        return 1
    vmm.stop()
    if ex is None:
        return 130
    print(f"\nkatapy vmm: guest ended: {ex.reason.value} {ex.detail}", file=sys.stderr)
    return 0 if ex.reason in (ExitReason.POWEROFF, ExitReason.RESET, ExitReason.TRIPLE_FAULT) else 1
