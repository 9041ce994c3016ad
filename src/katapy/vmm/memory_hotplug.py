"""Memory hotplug on the built-in VMM: KVM memory slots added and removed on a running VM.

The guest is told through the upcall channel (``katapy.vmm.upcall``, ADD_MEM /
DEL_MEM); katapy's guest agent probes and onlines the memory blocks through
sysfs (Documentation/admin-guide/mm/memory-hotplug.rst), which a stock kernel
with MEMORY_HOTPLUG, MEMORY_HOTREMOVE and ARCH_MEMORY_PROBE offers.  Why not
virtio-mem: it needs a device model and a guest driver that both negotiate
sub-block state; the probe interface needs neither and matches dbs-upcall's
ADD_MEM, at the cost of 128 MiB granularity and boot memory that never goes.

Layout: hot-added RAM lives in a window above both 4 GiB and the boot RAM,
aligned to 1 GiB; it grows in :data:`BLOCK_SIZE` blocks (the x86-64 memory
block size below 64 GiB of RAM), each its own memfd and KVM slot so any block
can be given back on its own.  Shrinking removes the highest blocks first.

Ordering keeps host and guest consistent:

* grow: memfd + mapping + KVM slot first (the guest can only online memory that
  exists), then ADD_MEM.  A refusal (the guest answered an errno) undoes the
  slots.  A timeout or a lost channel leaves the blocks plugged: the guest may
  have onlined them, and removing a slot under online memory would crash it.
* shrink: DEL_MEM first (the guest offlines, so nothing uses the blocks), then
  the slots and the host pages go.  A refusal or a lost answer keeps them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from katapy import log
from katapy.vmm.kvm.vm import VmFd
from katapy.vmm.memory import GuestMemory

_log = log.get("vmm.memory_hotplug")

MIB = 1 << 20
GIB = 1 << 30
#: memory block size of an x86-64 guest with under 64 GiB of RAM (arch/x86/mm/init_64.c probe_memory_block_size)
BLOCK_SIZE = 128 * MIB
#: the hot-add window starts on this boundary, above 4 GiB and the boot RAM
WINDOW_ALIGN = GIB
FOUR_GIB = 4 * GIB


class MemoryHotplugError(RuntimeError):
    """A resize that cannot be done; the message says why and what state the VM is in."""


class MemoryUpcall(Protocol):
    """The two device-manager requests memory hotplug needs (``katapy.vmm.upcall.DeviceManagerClient``)."""

    def add_memory(self, base: int, size: int) -> None: ...

    def remove_memory(self, base: int, size: int) -> None: ...


@dataclass(frozen=True)
class PluggedBlock:
    base: int
    size: int
    slot: int


def window_base(boot_ram_end: int) -> int:
    """First guest-physical address of the hot-add window for a VM whose boot RAM ends at ``boot_ram_end``."""
    top = max(boot_ram_end, FOUR_GIB)
    return (top + WINDOW_ALIGN - 1) // WINDOW_ALIGN * WINDOW_ALIGN


def _refused(exc: BaseException) -> bool:
    """True when the guest did not change anything: it answered with an errno, or the request never left
    (a connect failure, a bad greeting, a busy channel: ``UpcallError.sent`` is False)."""
    from katapy.vmm.upcall import UpcallError, UpcallRefused

    return isinstance(exc, UpcallRefused) or (isinstance(exc, UpcallError) and not exc.sent)


class MemoryHotplug:
    """The hot-added RAM of one VM: ``resize(extra_bytes)`` grows or shrinks it in whole blocks."""

    def __init__(self, vm: VmFd, mem: GuestMemory, boot_ram_end: int, max_extra: int, upcall: MemoryUpcall) -> None:
        if max_extra < 0 or max_extra % BLOCK_SIZE:
            raise MemoryHotplugError(f"hotplug limit {max_extra:#x} is not a multiple of {BLOCK_SIZE >> 20} MiB")
        self.vm = vm
        self.mem = mem
        self.base = window_base(boot_ram_end)
        self.max_extra = max_extra
        self.upcall = upcall
        self.blocks: list[PluggedBlock] = []
        self._lock = threading.Lock()

    @property
    def plugged(self) -> int:
        """Bytes of hot-added RAM the VM has now."""
        return len(self.blocks) * BLOCK_SIZE

    def resize(self, extra: int) -> int:
        """Make the hot-added RAM ``extra`` bytes (a multiple of BLOCK_SIZE, 0..max_extra); returns it."""
        if extra % BLOCK_SIZE:
            raise MemoryHotplugError(f"{extra >> 20} MiB is not a multiple of the {BLOCK_SIZE >> 20} MiB memory block")
        if not 0 <= extra <= self.max_extra:
            raise MemoryHotplugError(f"{extra >> 20} MiB of hot-added memory is outside 0..{self.max_extra >> 20} MiB")
        with self._lock:
            if extra > self.plugged:
                self._grow(extra // BLOCK_SIZE - len(self.blocks))
            elif extra < self.plugged:
                self._shrink(len(self.blocks) - extra // BLOCK_SIZE)
            return self.plugged

    def _grow(self, count: int) -> None:
        first = self.base + len(self.blocks) * BLOCK_SIZE
        new: list[PluggedBlock] = []
        try:
            for i in range(count):
                base = first + i * BLOCK_SIZE
                region = self.mem.add_region(base, BLOCK_SIZE)
                try:
                    slot = self.vm.add_memory_slot(base, BLOCK_SIZE, region.host_addr)
                except BaseException:
                    self.mem.remove_region(base)
                    raise
                new.append(PluggedBlock(base, BLOCK_SIZE, slot))
        except Exception as exc:
            self._release(new)
            raise MemoryHotplugError(f"adding {count * BLOCK_SIZE >> 20} MiB at {first:#x}: {exc}") from exc
        try:
            self.upcall.add_memory(first, count * BLOCK_SIZE)
        except Exception as exc:
            if _refused(exc):
                self._release(new)
                raise MemoryHotplugError(f"the guest refused or never got ADD_MEM of {count * BLOCK_SIZE >> 20} MiB "
                                         f"at {first:#x}: {exc}; the slots were removed") from exc
            self.blocks += new  # in doubt: the guest may have onlined them, so they stay
            raise MemoryHotplugError(f"adding {count * BLOCK_SIZE >> 20} MiB at {first:#x}: no answer from the guest "
                                     f"({exc}); the memory stays plugged") from exc
        self.blocks += new
        _log.info("memory added", base=hex(first), mib=count * BLOCK_SIZE >> 20, plugged_mib=self.plugged >> 20)

    def _shrink(self, count: int) -> None:
        gone = self.blocks[-count:]
        base = gone[0].base
        try:
            self.upcall.remove_memory(base, count * BLOCK_SIZE)
        except Exception as exc:
            raise MemoryHotplugError(f"removing {count * BLOCK_SIZE >> 20} MiB at {base:#x}: {exc}; "
                                     f"the memory stays plugged") from exc
        self.blocks = self.blocks[:-count]
        self._release(gone)
        _log.info("memory removed", base=hex(base), mib=count * BLOCK_SIZE >> 20, plugged_mib=self.plugged >> 20)

    def _release(self, blocks: list[PluggedBlock]) -> None:
        for b in reversed(blocks):
            try:
                self.vm.remove_memory_slot(b.slot)
            finally:
                self.mem.remove_region(b.base)
