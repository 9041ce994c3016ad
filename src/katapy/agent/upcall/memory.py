"""ADD_MEM / DEL_MEM through the memory hotplug files of a stock kernel.

Kernel ABI: Documentation/admin-guide/mm/memory-hotplug.rst ("Memory block
size", "Probing memory", "Onlining and offlining memory blocks") and
Documentation/ABI/testing/sysfs-devices-memory.  ``block_size_bytes`` is hex;
``probe`` (CONFIG_ARCH_MEMORY_PROBE) takes a block's physical address and adds
``memory<N>`` (N = address / block size); ``memory<N>/state`` reads
``online``/``offline`` and accepts ``online_movable`` and ``offline``
(CONFIG_MEMORY_HOTREMOVE).  Movable blocks can be emptied again, so they are
what a later DEL_MEM can give back.

Every request is all or nothing: a block that fails undoes what this request
changed, and the reply is the kernel's errno.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

SYS_MEMORY = Path("/sys/devices/system/memory")


class MemoryHotplugFailed(Exception):
    def __init__(self, err: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(err)}")
        self.errno = err


class MemorySysfs:
    """The files under ``root`` (``/sys/devices/system/memory``; a fake tree in the tests)."""

    def __init__(self, root: Path = SYS_MEMORY) -> None:
        self.root = Path(root)

    def block_size(self) -> int:
        try:
            return int((self.root / "block_size_bytes").read_text().strip(), 16)
        except (OSError, ValueError) as exc:
            raise MemoryHotplugFailed(errno.ENOTSUP, f"no memory hotplug in this kernel ({exc})") from None

    def _write(self, path: Path, text: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as exc:
            raise MemoryHotplugFailed(exc.errno or errno.EIO, f"{path} <- {text!r}") from None

    def exists(self, index: int) -> bool:
        return (self.root / f"memory{index}").is_dir()

    def probe(self, address: int) -> None:
        self._write(self.root / "probe", f"{address:#x}")

    def state(self, index: int) -> str:
        try:
            return (self.root / f"memory{index}" / "state").read_text().strip()
        except OSError as exc:
            raise MemoryHotplugFailed(exc.errno or errno.EIO, f"memory{index}/state") from None

    def set_state(self, index: int, state: str) -> None:
        self._write(self.root / f"memory{index}" / "state", state)


def _blocks(sysfs: MemorySysfs, base: int, size: int) -> list[int]:
    bs = sysfs.block_size()
    if size <= 0 or base % bs or size % bs:
        raise MemoryHotplugFailed(errno.EINVAL, f"range {base:#x}+{size:#x} is not whole {bs >> 20} MiB blocks")
    return [a // bs for a in range(base, base + size, bs)]


def _undo(sysfs: MemorySysfs, blocks: list[int], state: str, failure: MemoryHotplugFailed) -> None:
    """Put ``blocks`` back in ``state``; a block that will not go back is named in ``failure``'s message."""
    stuck = []
    for n in reversed(blocks):
        try:
            sysfs.set_state(n, state)
        except MemoryHotplugFailed:
            stuck.append(n)
    if stuck:
        failure.args = (f"{failure.args[0]}; and memory{', memory'.join(map(str, stuck))} did not go back to {state}",)


def add_memory(sysfs: MemorySysfs, base: int, size: int) -> None:
    """Probe (when the kernel does not know them yet) and online every block of the range."""
    blocks = _blocks(sysfs, base, size)
    bs = sysfs.block_size()
    onlined: list[int] = []
    try:
        for n in blocks:
            if not sysfs.exists(n):
                sysfs.probe(n * bs)
                if not sysfs.exists(n):
                    raise MemoryHotplugFailed(errno.EIO, f"probe of {n * bs:#x} added no memory{n}")
            if sysfs.state(n) != "online":
                sysfs.set_state(n, "online_movable")
                onlined.append(n)
    except MemoryHotplugFailed as exc:
        _undo(sysfs, onlined, "offline", exc)
        raise


def remove_memory(sysfs: MemorySysfs, base: int, size: int) -> None:
    """Offline every block of the range, highest first; a refusal re-onlines what was offlined."""
    blocks = _blocks(sysfs, base, size)
    offlined: list[int] = []
    try:
        for n in reversed(blocks):
            if not sysfs.exists(n) or sysfs.state(n) == "offline":
                continue
            sysfs.set_state(n, "offline")
            offlined.append(n)
    except MemoryHotplugFailed as exc:
        _undo(sysfs, offlined, "online_movable", exc)
        raise
