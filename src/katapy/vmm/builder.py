"""Turns :class:`~katapy.vmm.config.VmResources` into a VM ready to run (Firecracker's builder.rs).

Order matters for KVM: the irqchip (KVM_CREATE_IRQCHIP and the PIT, or
KVM_CAP_SPLIT_IRQCHIP) before any vCPU (api.rst 4.24, 7.8), memory slots
before the vCPUs run, CPUID before the other per-vCPU state (api.rst 4.73).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from katapy import log
from katapy.vmm.boot import layout, x86
from katapy.vmm.boot.vcpu_setup import VcpuSetup
from katapy.vmm.bus import Bus
from katapy.vmm.config import FlatBoot, IrqChip, KernelBoot, VmResources
from katapy.vmm.device_manager import MmioDeviceManager
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.kvm import consts
from katapy.vmm.kvm.system import Kvm
from katapy.vmm.kvm.vcpu import VcpuFd
from katapy.vmm.kvm.vm import VmFd
from katapy.vmm.legacy import i8042, ioapic, ports, serial
from katapy.vmm.memory import GuestMemory

_log = log.get("vmm.builder")

REQUIRED_CAPS = {
    "KVM_CAP_IRQCHIP": consts.KVM_CAP_IRQCHIP,
    "KVM_CAP_IRQFD": consts.KVM_CAP_IRQFD,
    "KVM_CAP_IOEVENTFD": consts.KVM_CAP_IOEVENTFD,
    "KVM_CAP_IMMEDIATE_EXIT": consts.KVM_CAP_IMMEDIATE_EXIT,
}
IRQCHIP_CAPS = {
    IrqChip.KERNEL: {"KVM_CAP_PIT2": consts.KVM_CAP_PIT2},
    IrqChip.SPLIT: {"KVM_CAP_SPLIT_IRQCHIP": consts.KVM_CAP_SPLIT_IRQCHIP,
                    "KVM_CAP_IRQ_ROUTING": consts.KVM_CAP_IRQ_ROUTING},
}


class BuildError(RuntimeError):
    pass


@dataclass
class BuiltVm:
    kvm: Kvm
    vm: VmFd
    mem: GuestMemory
    loop: EventLoop
    pio_bus: Bus
    mmio_bus: Bus
    devices: MmioDeviceManager
    serial: serial.Serial
    i8042: i8042.I8042
    vcpus: list[VcpuFd] = field(default_factory=list)  # every KVM vCPU created, boot and hot-added
    serial_irq_fd: int = -1
    cmdline: str = ""
    vcpu_setup: VcpuSetup | None = None  # what a vCPU created later needs (katapy.vmm.vcpu_hotplug)

    def create_vcpu(self, index: int) -> VcpuFd:
        """KVM_CREATE_VCPU with id (= APIC id) ``index``, then its per-vCPU setup.  The fd joins
        ``vcpus`` even when the setup fails: KVM cannot destroy a vCPU, and the VM closes it."""
        assert self.vcpu_setup is not None
        v = self.vm.create_vcpu(index)
        self.vcpus.append(v)
        self.vcpu_setup.configure(v)
        return v

    def close(self) -> None:
        """Release everything (vCPU threads must already be stopped)."""
        # The loop thread first: none of its device callbacks may run while the devices close
        # and guest memory is unmapped under them.
        self.loop.stop()
        self.devices.close()
        self.loop.close()
        for v in self.vcpus:
            v.close()
        if self.serial_irq_fd >= 0:
            os.close(self.serial_irq_fd)
            self.serial_irq_fd = -1
        self.vm.close()
        self.mem.close()
        self.kvm.close()


def _check_caps(kvm: Kvm, irqchip: IrqChip) -> None:
    needed = REQUIRED_CAPS | IRQCHIP_CAPS[irqchip]
    missing = [name for name, cap in needed.items() if not kvm.check_extension(cap)]
    if missing:
        raise BuildError(f"/dev/kvm lacks {', '.join(missing)}")


def build(res: VmResources, on_reset) -> BuiltVm:  # on_reset: Callable[[], None]
    res.validate()
    kvm = Kvm()
    cleanup: list = [kvm.close]
    try:
        _check_caps(kvm, res.machine.irqchip)
        vm = kvm.create_vm()
        cleanup.append(vm.close)
        vm.set_tss_addr()
        if kvm.check_extension(consts.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_addr()
        if res.machine.irqchip is IrqChip.KERNEL:
            vm.create_irqchip()
            vm.create_pit2()
        else:
            vm.enable_split_irqchip(ioapic.IOAPIC_PINS)
        mem_size = res.machine.mem_mib << 20
        mem = GuestMemory.create(layout.ram_regions(mem_size))
        cleanup.append(mem.close)
        vm.register_memory(mem)

        loop = EventLoop()
        cleanup.append(loop.close)
        pio, mmio = Bus("pio"), Bus("mmio")
        serial_irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        cleanup.append(lambda: os.close(serial_irq_fd))
        vm.register_irqfd(serial_irq_fd, serial.COM1_IRQ)
        uart = serial.Serial(res.serial_output, lambda: os.eventfd_write(serial_irq_fd, 1))
        kbd = i8042.I8042(on_reset)
        pio.insert(uart, serial.COM1_PORT, 8)
        pio.insert(kbd, i8042.DATA_PORT, i8042.PORT_SPAN)
        pio.insert(ports.DebugPort(), ports.DEBUG_PORT, 1)
        pio.insert(ports.Cmos(), ports.CMOS_PORT, 2)
        pio.insert(ports.NoPciBus(), ports.PCI_CONFIG_PORT, ports.PCI_CONFIG_SPAN)
        if res.machine.irqchip is IrqChip.SPLIT:
            pio.insert(ports.SilentPic(), ports.PIC_MASTER_PORT, ports.PIC_SPAN)
            pio.insert(ports.SilentPic(), ports.PIC_SLAVE_PORT, ports.PIC_SPAN)
            mmio.insert(ioapic.Ioapic(lambda routes: vm.set_gsi_routing([], routes)), ioapic.IOAPIC_BASE,
                        ioapic.IOAPIC_SIZE)

        devices = MmioDeviceManager(vm, mem, mmio, loop)
        cleanup.append(devices.close)
        for dev in res.devices:
            devices.add(dev)
        devices.reserve_hotplug(res.hotplug_slots)  # empty windows after the cold devices (device_hotplug)

        built = BuiltVm(kvm, vm, mem, loop, pio, mmio, devices, uart, kbd, serial_irq_fd=serial_irq_fd)
        cleanup.append(lambda: [v.close() for v in built.vcpus])
        # The MP table and every vCPU's CPUID describe max_vcpus CPUs (APIC id i for CPU i, all enabled,
        # so the guest's possible/present masks cover them; maxcpus=<vcpus> keeps the rest offline);
        # only ``vcpus`` KVM vCPUs exist now, katapy.vmm.vcpu_hotplug creates the others on demand.
        n = res.machine.vcpus
        possible = res.machine.max_vcpus or n
        boot = res.boot
        info = None
        if isinstance(boot, KernelBoot):
            built.cmdline = " ".join(filter(None, [boot.cmdline, *devices.cmdline_fragments()]))
            info = x86.configure_system(mem, mem_size, boot.kernel, boot.initrd, built.cmdline, possible,
                                        boot.protocol)
        elif isinstance(boot, FlatBoot):
            mem.write(boot.load_addr, boot.code)
        built.vcpu_setup = VcpuSetup(kvm.supported_cpuid(), possible,
                                     bool(kvm.check_extension(consts.KVM_CAP_TSC_DEADLINE_TIMER)),
                                     info, boot if isinstance(boot, FlatBoot) else None)
        for i in range(n):
            built.create_vcpu(i)
        _log.info("VM built", vcpus=n, max_vcpus=possible, mem_mib=res.machine.mem_mib, devices=len(res.devices),
                  cmdline=built.cmdline)
        return built
    except BaseException:
        # vCPU fds are closed with the VM; undo the rest in reverse order.
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception:
                pass
        raise
