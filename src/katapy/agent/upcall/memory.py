"""ADD_MEM / DEL_MEM on a stock kernel: probe, online and offline memory blocks through sysfs.

Kernel ABI, Documentation/admin-guide/mm/memory-hotplug.rst:

* "Memory Block Interface": hot-(un)pluggable memory comes in blocks of
  ``/sys/devices/system/memory/block_size_bytes`` bytes (hexadecimal without
  ``0x``; 128 MiB on x86-64); block ``N`` covers physical addresses
  ``[N * block_size, (N + 1) * block_size)`` and is the directory
  ``/sys/devices/system/memory/memory<N>`` (``N`` in decimal).  Its ``state``
  reads ``online``, ``offline`` or ``going-offline``.
* "Probing Memory" (CONFIG_ARCH_MEMORY_PROBE): writing a block's physical
  start address to ``/sys/devices/system/memory/probe`` makes the kernel add
  the block (``memory<N>`` appears, offline unless the kernel auto-onlines).
  There is no way back: an offlined block stays added.
* "Onlining and Offlining Memory Blocks": writing ``online_movable`` to
  ``state`` onlines the block into ZONE_MOVABLE, so that it can later be
  offlined; writing ``offline`` migrates its pages away and fails (EBUSY,
  EAGAIN...) when the kernel cannot.  Writing the state a block already has
  fails with EINVAL (``device_online``/``device_offline`` return 1), so the
  state is read first.

Upcall semantics (docs/protocols.md §8): a request either does everything or
undoes what it did and returns the errno.  ADD_MEM onlines every block of
``[base, base + size)``, probing those the kernel does not have; a block
already online is done.  DEL_MEM offlines them highest first; a block
already offline, or never added, is done.
"""
from __future__ import annotations

import errno

from katapy.agent import log
from katapy.agent.upcall.sysfs import Sysfs, errno_of

MEMORY = "sys/devices/system/memory"
ONLINE_TYPE = "online_movable"


class MemoryHotplug:
    """The memory block files under ``sysfs`` (``/sys/devices/system/memory``)."""

    def __init__(self, sysfs: Sysfs | None = None) -> None:
        self.sysfs = sysfs or Sysfs()
        self.dir = self.sysfs.path(MEMORY)

    def block_size(self) -> int:
        """``block_size_bytes``; OSError when it cannot be read or parsed (EOPNOTSUPP: no memory hotplug)."""
        path = self.dir / "block_size_bytes"
        try:
            text = self.sysfs.read(path).strip()
        except FileNotFoundError:
            raise OSError(errno.EOPNOTSUPP, f"no {path}: the guest kernel has no memory hotplug") from None
        try:
            size = int(text, 16)
        except ValueError:
            raise OSError(errno.EIO, f"{path}: not a hexadecimal size: {text!r}") from None
        if size <= 0:
            raise OSError(errno.EIO, f"{path}: block size {size}")
        return size

    def blocks(self, base: int, size: int, block_size: int | None = None) -> list[int]:
        """The block numbers covering ``[base, base + size)``, lowest first; OSError(EINVAL) unless block-aligned."""
        bs = block_size or self.block_size()
        if size <= 0 or base < 0 or base % bs or size % bs:
            raise OSError(errno.EINVAL, f"range {base:#x}+{size:#x} is not a whole number of "
                                        f"{bs:#x}-byte memory blocks")
        return list(range(base // bs, (base + size) // bs))

    def _block(self, n: int) -> str:
        return f"memory{n}"

    def state(self, n: int) -> str:
        """Block ``n``'s ``state`` (``online``, ``offline``, ``going-offline``); OSError if it has none."""
        return self.sysfs.read(self.dir / self._block(n) / "state").strip()

    def present(self, n: int) -> bool:
        return self.sysfs.exists(self.dir / self._block(n))

    def set_state(self, n: int, state: str) -> None:
        self.sysfs.write(self.dir / self._block(n) / "state", state)

    def probe(self, n: int, block_size: int) -> None:
        """Ask the kernel to add block ``n`` ("Probing Memory"); OSError as the store fails or adds nothing."""
        path = self.dir / "probe"
        try:
            self.sysfs.write(path, f"{n * block_size:#x}")
        except FileNotFoundError:
            raise OSError(errno.EOPNOTSUPP, f"no {path}: the guest kernel lacks CONFIG_ARCH_MEMORY_PROBE") from None
        if not self.present(n):
            raise OSError(errno.EIO, f"probing {n * block_size:#x} added no memory{n}")

    def add(self, base: int, size: int) -> int:
        """ADD_MEM: every block of the range online; 0 or ``-errno`` (then the blocks this call onlined are offline)."""
        onlined: list[int] = []
        try:
            bs = self.block_size()
            for n in self.blocks(base, size, bs):
                if not self.present(n):
                    self.probe(n, bs)
                    if self.state(n) == "online":  # the kernel auto-onlines (memhp_default_state=online)
                        onlined.append(n)
                        continue
                elif self.state(n) == "online":
                    continue
                self.set_state(n, ONLINE_TYPE)
                onlined.append(n)
        except OSError as exc:
            self._undo(onlined, "offline")
            log.warning("upcall: adding memory failed", base=f"{base:#x}", size=f"{size:#x}", error=str(exc),
                        undone=len(onlined))
            return -errno_of(exc)
        log.info("upcall: memory online", base=f"{base:#x}", size=f"{size:#x}", onlined=len(onlined))
        return 0

    def remove(self, base: int, size: int) -> int:
        """DEL_MEM: every block of the range offline, highest first; 0 or ``-errno`` (then they are back online)."""
        offlined: list[int] = []
        try:
            for n in reversed(self.blocks(base, size)):
                if not self.present(n) or self.state(n) == "offline":
                    continue
                self.set_state(n, "offline")
                offlined.append(n)
        except OSError as exc:
            self._undo(offlined, ONLINE_TYPE)
            log.warning("upcall: removing memory failed", base=f"{base:#x}", size=f"{size:#x}", error=str(exc),
                        undone=len(offlined))
            return -errno_of(exc)
        log.info("upcall: memory offline", base=f"{base:#x}", size=f"{size:#x}", offlined=len(offlined))
        return 0

    def _undo(self, done: list[int], state: str) -> None:
        """Put ``done`` back in ``state``, newest first; failures are logged (the request fails anyway)."""
        for n in reversed(done):
            try:
                self.set_state(n, state)
            except OSError as exc:
                if state != ONLINE_TYPE:
                    log.error("upcall: cannot undo memory block", block=n, state=state, error=str(exc))
                    continue
                try:  # the kernel may not allow ZONE_MOVABLE there now: any zone beats staying offline
                    self.set_state(n, "online")
                except OSError as exc2:
                    log.error("upcall: cannot re-online memory block", block=n, error=str(exc2))
