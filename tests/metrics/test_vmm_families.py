"""The shim asks its backend for the built-in VMM's counters only where the backend has them (not qemu)."""
from __future__ import annotations

from katapy.shim.metrics import _call


class _Builtin:
    def exit_counts(self) -> dict[str, int]:
        return {"io_out": 3}

    def virtio_counts(self) -> list:
        return []


class _Qemu:
    pass


def test_counters_come_from_backends_that_have_them_and_are_absent_otherwise():
    assert _call(_Builtin(), "exit_counts") == {"io_out": 3}
    assert _call(_Builtin(), "virtio_counts") == []
    assert _call(_Qemu(), "exit_counts") is None
    assert _call(_Qemu(), "virtio_counts") is None
