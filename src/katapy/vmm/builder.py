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
from katapy.vmm.bus import Bus
from katapy.vmm.config import FlatBoot, IrqChip, KernelBoot, VmResources
from katapy.vmm.device_manager import MmioDeviceManager
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.kvm import consts
from katapy.vmm.kvm.system import Kvm
from katapy.vmm.kvm.vcpu import Regs, VcpuFd
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
    vcpus: list[VcpuFd] = field(default_factory=list)
    serial_irq_fd: int = -1
    cmdline: str = ""

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


def _flat_vcpu_state(vcpu: VcpuFd, boot: FlatBoot) -> None:
    """Real mode at ``load_addr``: CS base is the 64 KiB block, IP the rest."""
    s = vcpu.get_sregs()
    seg_base = boot.load_addr & ~0xFFFF
    s.cs.base, s.cs.selector = seg_base, seg_base >> 4
    for seg in (s.ds, s.es, s.ss):
        seg.base, seg.selector = 0, 0
    vcpu.set_sregs(s)
    vcpu.set_regs(Regs(rip=boot.load_addr & 0xFFFF, rsp=0x7000 - 0x100 * vcpu.index, rflags=0x2))
    if vcpu.index > 0:
        vcpu.set_mp_state(consts.KVM_MP_STATE_RUNNABLE)  # no INIT/SIPI dance for flat images


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

        built = BuiltVm(kvm, vm, mem, loop, pio, mmio, devices, uart, kbd, serial_irq_fd=serial_irq_fd)
        cleanup.append(lambda: [v.close() for v in built.vcpus])
        n = res.machine.vcpus
        boot = res.boot
        info = None
        if isinstance(boot, KernelBoot):
            built.cmdline = " ".join(filter(None, [boot.cmdline, *devices.cmdline_fragments()]))
            info = x86.configure_system(mem, mem_size, boot.kernel, boot.initrd, built.cmdline, n, boot.protocol)
        elif isinstance(boot, FlatBoot):
            mem.write(boot.load_addr, boot.code)
        supported = kvm.supported_cpuid()
        tsc_deadline = bool(kvm.check_extension(consts.KVM_CAP_TSC_DEADLINE_TIMER))
        for i in range(n):
            v = vm.create_vcpu(i)
            built.vcpus.append(v)
            if info is not None:
                x86.configure_vcpu(v, info, supported, n, tsc_deadline)
            else:
                from katapy.vmm.boot.cpuid import vcpu_cpuid

                v.set_cpuid2(vcpu_cpuid(supported, i, n, tsc_deadline))
                _flat_vcpu_state(v, boot)  # type: ignore[arg-type]
        _log.info("VM built", vcpus=n, mem_mib=res.machine.mem_mib, devices=len(res.devices), cmdline=built.cmdline)
        return built
    except BaseException:
        # vCPU fds are closed with the VM; undo the rest in reverse order.
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception:
                pass
        raise
