"""A typed façade over :class:`UpcallChannel` for dbs-upcall's device-manager service.

Kata ``src/dragonball/crates/dbs_upcall/src/dev_mgr_service.rs`` (message
layouts in :mod:`katapy.upcall.wire`).  Each method sends one request and
returns None once the guest answered ``ret == 0``; otherwise it raises an
:class:`~katapy.vmm.upcall.errors.UpcallError` (:class:`UpcallRefused` carries
the guest's errno, and ``cpu_index``, the first CPU that failed, for CPU
requests).  Arguments are checked before anything is sent (``ValueError``).
"""
from __future__ import annotations

from collections.abc import Iterable

from katapy.upcall import wire
from katapy.vmm.upcall.channel import UpcallChannel

_U64 = 1 << 64
_U32 = 1 << 32


def _apic_ids(apic_ids: Iterable[int]) -> tuple[int, ...]:
    ids = tuple(int(a) for a in apic_ids)
    if not 0 < len(ids) <= wire.MAX_APIC_IDS:
        raise ValueError(f"{len(ids)} APIC ids: between 1 and {wire.MAX_APIC_IDS} per request")
    bad = [a for a in ids if not 0 <= a <= 0xFF]
    if bad:
        raise ValueError(f"APIC ids {bad} out of range 0..255")
    if len(set(ids)) != len(ids):
        raise ValueError(f"APIC ids {list(ids)} repeat an id")
    return ids


def _range(base: int, size: int) -> None:
    if base < 0 or size <= 0 or base + size > _U64:
        raise ValueError(f"range base={base:#x} size={size:#x}: need base >= 0, size > 0, end within 64 bits")


class DeviceManagerClient:
    """The device-manager requests of dbs-upcall, over ``channel``."""

    def __init__(self, channel: UpcallChannel) -> None:
        self.channel = channel

    def _send(self, req: wire.Request, timeout: float | None) -> None:
        self.channel.request(req, timeout=timeout)

    # -- vCPUs ------------------------------------------------------------------------
    def add_cpus(self, apic_ids: Iterable[int], *, apic_ver: int | None = None,
                 timeout: float | None = None) -> None:
        """ADD_CPU: the guest registers and onlines the vCPUs with these APIC ids (already created by the VMM)."""
        self._send(wire.Request(wire.MsgType.ADD_CPU, self._cpu(apic_ids, apic_ver)), timeout)

    def del_cpus(self, apic_ids: Iterable[int], *, apic_ver: int | None = None,
                 timeout: float | None = None) -> None:
        """DEL_CPU: the guest offlines and unregisters the vCPUs with these APIC ids."""
        self._send(wire.Request(wire.MsgType.DEL_CPU, self._cpu(apic_ids, apic_ver)), timeout)

    @staticmethod
    def _cpu(apic_ids: Iterable[int], apic_ver: int | None) -> wire.CpuRequest:
        ids = _apic_ids(apic_ids)
        if apic_ver is None:
            return wire.CpuRequest(ids)
        if not 0 <= apic_ver <= 0xFF:
            raise ValueError(f"APIC version {apic_ver:#x} out of range 0..0xff")
        return wire.CpuRequest(ids, apic_ver)

    # -- memory -----------------------------------------------------------------------
    def add_memory(self, base: int, size: int, *, timeout: float | None = None) -> None:
        """ADD_MEM: the guest adds (and onlines) guest-physical ``[base, base+size)``, memory-block aligned."""
        _range(base, size)
        self._send(wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest(base, size)), timeout)

    def remove_memory(self, base: int, size: int, *, timeout: float | None = None) -> None:
        """DEL_MEM: the guest offlines and removes ``[base, base+size)``."""
        _range(base, size)
        self._send(wire.Request(wire.MsgType.DEL_MEM, wire.MemRequest(base, size)), timeout)

    # -- virtio-mmio devices ------------------------------------------------------------
    def add_mmio(self, base: int, size: int, irq: int, *, timeout: float | None = None) -> None:
        """ADD_MMIO: the guest registers a virtio-mmio device at ``[base, base+size)`` on ``irq``."""
        self._send(wire.Request(wire.MsgType.ADD_MMIO, self._mmio(base, size, irq)), timeout)

    def remove_mmio(self, base: int, size: int, irq: int, *, timeout: float | None = None) -> None:
        """DEL_MMIO: the guest unregisters the virtio-mmio device with that window and irq."""
        self._send(wire.Request(wire.MsgType.DEL_MMIO, self._mmio(base, size, irq)), timeout)

    @staticmethod
    def _mmio(base: int, size: int, irq: int) -> wire.MmioRequest:
        _range(base, size)
        if not 0 <= irq < _U32:
            raise ValueError(f"irq {irq} out of range")
        return wire.MmioRequest(base, size, irq)

    def close(self) -> None:
        self.channel.close()
