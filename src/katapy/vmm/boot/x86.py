"""Put everything a kernel needs into guest RAM and into each vCPU (Firecracker's
arch::x86_64::configure_system + vstate::vcpu::configure, in one place).

Boot sequence (see docs/vmm.md):
1. load the kernel (``loader``), 2. the initrd at the top of low RAM,
3. the command line at 0x20000, 4. the MP table at 0x9fc00,
5. the zero page (Linux 64-bit protocol) or hvm_start_info (PVH),
6. GDT/IDT and page tables, 7. per vCPU: CPUID, MSRs, LINT pins; registers, FPU and
   sregs for the boot vCPU only (the others wait for the guest's INIT-SIPI-SIPI).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from katapy.vmm.boot import e820, layout, mptable, msrs, paging, pvh, regs, zeropage
from katapy.vmm.boot.cpuid import vcpu_cpuid
from katapy.vmm.boot.loader import BootProtocol, LoadedKernel, initrd_address, load_kernel
from katapy.vmm.boot.setup_header import DEFAULT_INITRD_ADDR_MAX
from katapy.vmm.kvm.cpuid import CpuidEntry
from katapy.vmm.kvm.vcpu import VcpuFd
from katapy.vmm.memory import GuestMemory


class BootError(ValueError):
    pass


@dataclass
class BootInfo:
    """What configure_system put where; the vCPUs need it."""

    kernel: LoadedKernel
    cmdline_addr: int
    initrd: tuple[int, int] | None
    boot_struct_addr: int  # zero page or hvm_start_info


def write_cmdline(mem: GuestMemory, cmdline: str, max_size: int = layout.CMDLINE_MAX_SIZE) -> int:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL byte")
    if len(raw) + 1 > max_size:
        raise BootError(f"kernel command line is {len(raw)} bytes; the limit is {max_size - 1}")
    mem.write(layout.CMDLINE_START, raw + b"\0")
    return len(raw) + 1


def configure_system(
    mem: GuestMemory,
    mem_size: int,
    kernel_path: Path,
    initrd_path: Path | None,
    cmdline: str,
    num_cpus: int,
    protocol: BootProtocol = BootProtocol.LINUX64,
) -> BootInfo:
    """Load the kernel and write every boot structure into ``mem``."""
    kernel = load_kernel(mem, kernel_path, protocol)
    header = kernel.header
    cmdline_max = layout.CMDLINE_MAX_SIZE
    if header is not None and header.cmdline_size:
        cmdline_max = min(cmdline_max, header.cmdline_size + 1)
    cmdline_len = write_cmdline(mem, cmdline, cmdline_max)

    initrd = None
    if initrd_path is not None:
        data = Path(initrd_path).read_bytes()
        addr_max = header.initrd_addr_max if header is not None else DEFAULT_INITRD_ADDR_MAX
        addr = initrd_address(mem_size, len(data), kernel.kernel_end, addr_max)
        mem.write(addr, data)
        initrd = (addr, len(data))

    mem.write(layout.MPTABLE_START, mptable.build(num_cpus))
    memory_map = e820.memory_map(mem_size)
    if kernel.protocol is BootProtocol.PVH:
        mem.write(layout.PVH_MEMMAP_START, pvh.memmap(memory_map))
        if initrd:
            mem.write(layout.PVH_MODLIST_START, pvh.modlist_entry(*initrd))
        mem.write(layout.PVH_INFO_START, pvh.start_info(layout.CMDLINE_START, len(memory_map), initrd))
        boot_struct = layout.PVH_INFO_START
    else:
        page = zeropage.build(layout.CMDLINE_START, cmdline_len - 1, memory_map, initrd, header)
        mem.write(layout.ZERO_PAGE_START, page)
        boot_struct = layout.ZERO_PAGE_START

    long_mode = kernel.protocol is BootProtocol.LINUX64
    for addr, blob in regs.boot_gdt_and_idt(long_mode).items():
        mem.write(addr, blob)
    if long_mode:
        paging.write_page_tables(mem)
    return BootInfo(kernel, layout.CMDLINE_START, initrd, boot_struct)


def configure_vcpu(
    vcpu: VcpuFd,
    info: BootInfo,
    supported_cpuid: list[CpuidEntry],
    num_cpus: int,
    tsc_deadline: bool,
) -> None:
    """CPUID, MSRs and LAPIC LINT pins of one vCPU (needs the in-kernel irqchip); the boot processor
    also gets the entry registers, FPU and segment/paging state.

    Application processors stay in their reset state, waiting in KVM for the INIT-SIPI-SIPI the
    guest kernel sends them (Intel SDM vol. 3A 9.4 "Multiple-Processor Initialization"; KVM keeps a
    non-boot vCPU in KVM_MP_STATE_UNINITIALIZED until then), as hardware and QEMU do.
    """
    vcpu.set_cpuid2(vcpu_cpuid(supported_cpuid, vcpu.index, num_cpus, tsc_deadline))
    wanted = msrs.boot_msrs()
    accepted = vcpu.set_msrs(wanted)
    if accepted != len(wanted):
        raise BootError(f"KVM accepted only {accepted} of {len(wanted)} boot MSRs")
    if vcpu.index == 0:
        long_mode = info.kernel.protocol is BootProtocol.LINUX64
        if long_mode:
            vcpu.set_regs(regs.linux64_regs(info.kernel.entry, info.boot_struct_addr))
        else:
            vcpu.set_regs(regs.pvh_regs(info.kernel.entry, info.boot_struct_addr))
        vcpu.set_fpu(regs.boot_fpu())
        vcpu.set_sregs(regs.boot_sregs(vcpu.get_sregs(), long_mode))
    vcpu.set_lapic(regs.with_lint_pins(vcpu.get_lapic()))
