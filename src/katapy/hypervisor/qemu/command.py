"""The QEMU command line for one sandbox VM (microvm machine type).

Machine: ``microvm`` (QEMU ``docs/system/i386/microvm.rst``): no PCI, no
firmware tables, virtio-mmio devices.  ``acpi=off`` matters: a guest kernel
without ACPI finds the virtio-mmio devices only through the
``virtio_mmio.device=`` parameters QEMU appends to the command line when ACPI
is off (``auto-kernel-cmdline``, on by default).  The RTC is on: under TCG
there is no kvm-clock, and the CMOS clock is where the guest kernel reads the
wall time at boot (arch/x86/kernel/rtc.c); without it containers start in 1970
and every certificate looks invalid.  The PIT and PIC stay (Linux calibrates with the
PIT under TCG).  ``-no-reboot`` turns a guest reset into a QEMU exit, and
``panic=-1`` on the kernel command line turns a guest panic into a reset, so
every way a guest ends is a QEMU exit that the backend sees.

Guest RAM is a shared memfd (``memory-backend-memfd,share=on``) because the
vhost-user back ends map it (vhost-user spec: "memory regions ... must be
shared").  ``-S`` starts with vCPUs stopped; the backend sends ``cont`` over
QMP once it is connected, so no guest instruction runs before the host side
is ready.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from katapy.hypervisor.base import BlockDevice, NetDevice, VmConfig


@dataclass(frozen=True)
class VhostUserPort:
    """A vhost-user device QEMU drives, served by katapy at ``socket``."""

    dev_id: str
    socket: Path
    device: str  # QEMU device model, e.g. "vhost-user-vsock-device"
    props: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QemuLaunch:
    """Everything ``build_command`` needs beyond the VmConfig."""

    binary: Path
    accel: str  # "kvm" | "tcg"
    qmp_socket: Path
    vhost_user: tuple[VhostUserPort, ...] = ()
    block: tuple[BlockDevice, ...] = ()
    net: tuple[NetDevice, ...] = ()
    seccomp: bool = True  # QEMU's -sandbox: deny obsolete syscalls, privilege changes, spawning


def _opts(*parts: str, **kv: str) -> str:
    """QEMU option syntax: ``a,b,key=value``; commas inside values are doubled."""
    items = list(parts) + [f"{k.replace('_', '-')}={str(v).replace(',', ',,')}" for k, v in kv.items()]
    return ",".join(items)


def build_command(cfg: VmConfig, launch: QemuLaunch) -> list[str]:
    """The full argv for qemu-system-x86_64."""
    mem = f"{cfg.memory_mib}M"
    argv = [
        str(launch.binary),
        "-name", _opts(f"katapy-{cfg.sandbox_id}", debug_threads="on"),
        "-M", _opts("microvm", "x-option-roms=off", "rtc=on", "acpi=off", "isa-serial=on", memory_backend="mem"),
        "-accel", launch.accel,
        "-cpu", "host" if launch.accel == "kvm" else "max",
        # all max_vcpus present: microvm cannot hotplug a CPU (no ACPI/PCI), so the guest boots with
        # maxcpus=<vcpus> (VmConfig.guest_cmdline) and onlines the rest when the pod grows
        "-smp", str(cfg.max_vcpus),
        "-m", mem,
        "-object", _opts("memory-backend-memfd", id="mem", size=mem, share="on"),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-S",
        "-serial", f"file:{cfg.console_path}",
        "-monitor", "none",
        "-qmp", _opts(f"unix:{launch.qmp_socket}", server="on", wait="off"),
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", cfg.guest_cmdline(),
    ]
    if launch.seccomp:
        argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    for port in launch.vhost_user:
        argv += ["-chardev", _opts("socket", id=f"chr-{port.dev_id}", path=str(port.socket))]
        argv += ["-device", _opts(port.device, id=port.dev_id, chardev=f"chr-{port.dev_id}", **port.props)]
    for blk in launch.block:
        argv += ["-blockdev", _opts(
            "driver=file", node_name=f"file-{blk.dev_id}", filename=str(blk.path), read_only="on" if blk.read_only else "off"
        )]
        argv += ["-blockdev", _opts(
            "driver=raw", node_name=blk.dev_id, file=f"file-{blk.dev_id}", read_only="on" if blk.read_only else "off"
        )]
        argv += ["-device", _opts("virtio-blk-device", id=f"dev-{blk.dev_id}", drive=blk.dev_id)]
    for net in launch.net:
        if net.tap_fd is not None:  # opened in the pod netns; QEMU inherits it (pass_fds)
            argv += ["-netdev", _opts("tap", id=net.dev_id, fd=str(net.tap_fd), vhost="off")]
        else:
            argv += ["-netdev", _opts("tap", id=net.dev_id, ifname=net.tap_name, script="no", downscript="no",
                                      vhost="off")]
        argv += ["-device", _opts("virtio-net-device", id=f"dev-{net.dev_id}", netdev=net.dev_id, mac=net.mac)]
    return argv
