"""The KVM VM fd: memory slots, in-kernel irqchip and PIT, irqfd, ioeventfd, MSI, vCPU creation.

Documentation/virt/kvm/api.rst: KVM_SET_USER_MEMORY_REGION (4.35),
KVM_SET_TSS_ADDR (4.48), KVM_SET_IDENTITY_MAP_ADDR (4.69), KVM_CREATE_IRQCHIP
(4.24, KVM_CAP_IRQCHIP), KVM_CREATE_PIT2 (4.71, KVM_CAP_PIT2), KVM_IRQ_LINE
(4.25), KVM_IRQFD (4.75, KVM_CAP_IRQFD), KVM_IOEVENTFD (4.59,
KVM_CAP_IOEVENTFD), KVM_SIGNAL_MSI (4.70, KVM_CAP_SIGNAL_MSI),
KVM_SET_GSI_ROUTING (4.52, KVM_CAP_IRQ_ROUTING), KVM_CREATE_VCPU (4.7),
KVM_ENABLE_CAP (4.37) with KVM_CAP_SPLIT_IRQCHIP (7.8).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from katapy.vmm.kvm._ffi import check, ffi, lib
from katapy.vmm.memory import GuestMemory

if TYPE_CHECKING:
    from katapy.vmm.kvm.system import Kvm
    from katapy.vmm.kvm.vcpu import VcpuFd

# x86 layout used by every KVM VMM (Firecracker arch/x86_64/layout.rs): three
# pages for the real-mode TSS and one for the EPT identity map, just below the
# 4 GiB boundary where no RAM or MMIO lives.
KVM_TSS_ADDRESS = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000


@dataclass(frozen=True)
class MsiRoute:
    gsi: int
    address: int
    data: int


class VmFd:
    """An open KVM VM."""

    def __init__(self, fd: int, kvm: "Kvm"):
        self.fd = fd
        self.kvm = kvm
        self._next_slot = 0
        self._free_slots: set[int] = set()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        """Per-VM capability check (KVM_CAP_CHECK_EXTENSION_VM semantics; the system fd answers the same here)."""
        r = lib.katapy_ioctl(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return r if r > 0 else 0

    # -- memory -------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {"slot": slot, "flags": flags, "guest_phys_addr": guest_phys, "memory_size": size, "userspace_addr": host_addr},
        )
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region), "KVM_SET_USER_MEMORY_REGION")

    def register_memory(self, mem: GuestMemory) -> list[int]:
        """Make every region of ``mem`` a KVM memory slot; returns the slot numbers."""
        slots = []
        for r in mem.regions:
            slot = self._next_slot
            self.set_user_memory_region(slot, int(r.guest_base), r.size, r.host_addr)
            self._next_slot += 1
            slots.append(slot)
        return slots

    def add_memory_slot(self, guest_phys: int, size: int, host_addr: int) -> int:
        """One more memory slot on a running VM (hot-added RAM); returns its number.

        api.rst 4.35: a slot may be created while vCPUs run; slot numbers of removed slots are reused.
        """
        slot = min(self._free_slots) if self._free_slots else self._next_slot
        self.set_user_memory_region(slot, guest_phys, size, host_addr)
        if slot in self._free_slots:
            self._free_slots.remove(slot)
        else:
            self._next_slot += 1
        return slot

    def remove_memory_slot(self, slot: int) -> None:
        """Delete a slot (api.rst 4.35: ``memory_size`` 0 removes it); the guest must not be using it."""
        if slot >= self._next_slot or slot in self._free_slots:
            raise ValueError(f"memory slot {slot} is not in use")
        self.set_user_memory_region(slot, 0, 0, 0)
        self._free_slots.add(slot)

    # -- x86 housekeeping -------------------------------------------------
    def set_tss_addr(self, addr: int = KVM_TSS_ADDRESS) -> None:
        check(lib.katapy_ioctl(self.fd, lib.KVM_SET_TSS_ADDR, addr), "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int = KVM_IDENTITY_MAP_ADDRESS) -> None:
        p = ffi.new("__u64 *", addr)
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, p), "KVM_SET_IDENTITY_MAP_ADDR")

    # -- interrupts -----------------------------------------------------------
    def create_irqchip(self) -> None:
        """In-kernel PIC pair, IOAPIC and per-vCPU LAPICs (must precede vCPU creation)."""
        check(lib.katapy_ioctl(self.fd, lib.KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")

    def enable_split_irqchip(self, ioapic_pins: int) -> None:
        """LAPICs in KVM, IOAPIC and PIC in the VMM (api.rst 7.8; must precede vCPU creation).

        GSIs below ``ioapic_pins`` are the VMM's IOAPIC pins: their routes are MSIs the VMM
        programs, and an EOI of a level-triggered one exits with KVM_EXIT_IOAPIC_EOI.
        """
        cap = ffi.new("struct kvm_enable_cap *", {"cap": lib.KVM_CAP_SPLIT_IRQCHIP})
        cap.args[0] = ioapic_pins
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_ENABLE_CAP, cap), "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)")

    def create_pit2(self) -> None:
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = lib.KVM_PIT_SPEAKER_DUMMY
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, cfg), "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        lvl = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_IRQ_LINE, lvl), "KVM_IRQ_LINE")

    def register_irqfd(self, eventfd: int, gsi: int) -> None:
        """Writing ``eventfd`` injects an edge on ``gsi`` (IOAPIC pin for gsi < 24)."""
        req = ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi, "flags": 0})
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_IRQFD, req), "KVM_IRQFD")

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        req = ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN})
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_IRQFD, req), "KVM_IRQFD(deassign)")

    def signal_msi(self, address: int, data: int) -> int:
        """Inject one MSI; returns >0 when delivered, 0 when the guest blocked it."""
        msi = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data})
        return check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SIGNAL_MSI, msi), "KVM_SIGNAL_MSI")

    def set_gsi_routing(self, irqchip_pins: list[tuple[int, int, int]], msi: list[MsiRoute] = ()) -> None:  # type: ignore[assignment]
        """Replace the GSI routing table: ``irqchip_pins`` are (gsi, irqchip, pin)."""
        n = len(irqchip_pins) + len(msi)
        table = ffi.new("struct kvm_irq_routing *", {"nr": n, "entries": n})
        table.nr = n
        i = 0
        for gsi, chip, pin in irqchip_pins:
            e = table.entries[i]
            e.gsi, e.type = gsi, lib.KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
            i += 1
        for m in msi:
            e = table.entries[i]
            e.gsi, e.type = m.gsi, lib.KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = m.address & 0xFFFFFFFF, m.address >> 32, m.data
            i += 1
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_SET_GSI_ROUTING, table), "KVM_SET_GSI_ROUTING")

    def _ioeventfd(self, eventfd: int, addr: int, length: int, datamatch: int | None, pio: bool, deassign: bool) -> None:
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": eventfd, "flags": flags},
        )
        check(lib.katapy_ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, req), "KVM_IOEVENTFD")

    def register_ioeventfd(
        self, eventfd: int, addr: int, length: int = 4, datamatch: int | None = None, pio: bool = False
    ) -> None:
        """A guest write of ``length`` bytes (equal to ``datamatch`` if given) at ``addr`` signals ``eventfd``
        inside KVM, with no exit to userspace."""
        self._ioeventfd(eventfd, addr, length, datamatch, pio, deassign=False)

    def unregister_ioeventfd(
        self, eventfd: int, addr: int, length: int = 4, datamatch: int | None = None, pio: bool = False
    ) -> None:
        self._ioeventfd(eventfd, addr, length, datamatch, pio, deassign=True)

    # -- vCPUs ----------------------------------------------------------------
    def create_vcpu(self, index: int) -> "VcpuFd":
        from katapy.vmm.kvm.vcpu import VcpuFd

        fd = check(lib.katapy_ioctl(self.fd, lib.KVM_CREATE_VCPU, index), "KVM_CREATE_VCPU")
        try:
            return VcpuFd(fd, index, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
