"""What the user asked the VMM for (Firecracker's resources.rs): plain data, checked, no KVM state."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from katapy.vmm.boot import layout
from katapy.vmm.boot.loader import BootProtocol
from katapy.vmm.virtio.device import VirtioDevice

MAX_VCPUS = 254  # MP table limit (APIC ids are 8 bits, one is the IOAPIC's)
MIN_MEM_MIB = 2

#: Command-line parameters that suit the built-in VMM's legacy devices (no PCI, one UART,
#: an i8042 without keyboard/mouse, reboot through the i8042 reset line).
#: The i8042 here has no AUX (mouse) port and no keyboard: without these the guest's probe polls the
#: status port ~10,000 times per AUX/MUX test (one VM exit each) before giving up.
I8042_KERNEL_PARAMS = "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
LEGACY_KERNEL_PARAMS = f"reboot=k panic=1 pci=off nomodule {I8042_KERNEL_PARAMS}"


class ConfigError(ValueError):
    pass


class IrqChip(enum.Enum):
    """Where the interrupt controllers live.

    ``KERNEL``: KVM's PIC pair, I/O APIC, PIT and LAPICs (KVM_CREATE_IRQCHIP + KVM_CREATE_PIT2, as
    Firecracker sets up).  ``SPLIT``: KVM's LAPICs, katapy's I/O APIC delivering MSIs through KVM
    routes, a PIC that never fires and no PIT (KVM_CAP_SPLIT_IRQCHIP, as cloud-hypervisor and QEMU's
    microvm set up); Linux guests keep time with kvm-clock and the LAPIC timer.
    """

    KERNEL = "kernel"
    SPLIT = "split"


@dataclass
class MachineConfig:
    vcpus: int = 1
    mem_mib: int = 128
    irqchip: IrqChip = IrqChip.KERNEL
    #: the most RAM the VM may have with hot-added memory (None: mem_mib, no memory hotplug)
    max_mem_mib: int | None = None
    #: the vCPUs the VM may have with hot-added ones (the MP table and CPUID describe this many;
    #: ``vcpus`` of them are created at start, katapy.vmm.vcpu_hotplug adds the rest); None: vcpus
    max_vcpus: int | None = None

    def __post_init__(self) -> None:
        if self.max_vcpus is None:
            self.max_vcpus = self.vcpus

    def validate(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"vcpus={self.vcpus}: must be 1..{MAX_VCPUS}")
        if self.max_vcpus is None or not self.vcpus <= self.max_vcpus <= MAX_VCPUS:
            raise ConfigError(f"max_vcpus={self.max_vcpus}: must be vcpus ({self.vcpus})..{MAX_VCPUS}")
        if self.mem_mib < MIN_MEM_MIB:
            raise ConfigError(f"mem_mib={self.mem_mib}: must be at least {MIN_MEM_MIB}")
        if self.max_mem_mib is not None and self.max_mem_mib < self.mem_mib:
            raise ConfigError(f"max_mem_mib={self.max_mem_mib}: below mem_mib={self.mem_mib}")


@dataclass
class KernelBoot:
    """A Linux kernel (ELF vmlinux or bzImage) with optional initrd."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    protocol: BootProtocol = BootProtocol.LINUX64

    def validate(self) -> None:
        for p in (self.kernel, self.initrd):
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"{p}: no such file")


@dataclass
class FlatBoot:
    """A flat binary entered in 16-bit real mode at ``load_addr`` (all vCPUs start runnable there).

    For firmware-like payloads and the VMM's own tests: no boot structures are written.
    """

    code: bytes
    load_addr: int = 0x1000

    def validate(self) -> None:
        if not self.code:
            raise ConfigError("flat boot image is empty")
        if self.load_addr < 0x500 or self.load_addr + len(self.code) > 0xA0000:
            raise ConfigError("flat boot image must lie between 0x500 and 640 KiB")


BootSource = KernelBoot | FlatBoot


#: virtio-mmio windows the IOAPIC pins layout.VIRTIO_IRQ_BASE..VIRTIO_IRQ_MAX can serve (cold and hotplug together)
VIRTIO_MMIO_PINS = layout.VIRTIO_IRQ_MAX - layout.VIRTIO_IRQ_BASE + 1


@dataclass
class VmResources:
    machine: MachineConfig = field(default_factory=MachineConfig)
    boot: BootSource | None = None
    devices: list[VirtioDevice] = field(default_factory=list)
    serial_output: Callable[[bytes], None] | None = None
    #: empty virtio-mmio windows reserved after the devices for device hotplug (katapy.vmm.device_hotplug)
    hotplug_slots: int = 0

    def validate(self) -> None:
        self.machine.validate()
        if not 0 <= self.hotplug_slots <= VIRTIO_MMIO_PINS - len(self.devices):
            raise ConfigError(
                f"hotplug_slots={self.hotplug_slots}: must be 0..{VIRTIO_MMIO_PINS - len(self.devices)} (IOAPIC pins "
                f"{layout.VIRTIO_IRQ_BASE}..{layout.VIRTIO_IRQ_MAX} serve {VIRTIO_MMIO_PINS} virtio-mmio windows, "
                f"{len(self.devices)} taken by cold-plugged devices)")
        if self.boot is None:
            raise ConfigError("no boot source set")
        self.boot.validate()
