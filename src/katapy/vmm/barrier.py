"""A full memory barrier for the shared-memory protocols between the VMM and the guest.

x86 is TSO: stores are seen in order and loads in order, but a load may be
satisfied before an earlier store of the same thread is visible to other CPUs
(Intel SDM vol. 3A 9.2.2, "stores may be reordered with older loads to
different locations" in the reverse direction).  A virtio device that first
publishes an index and then reads the driver's suppression fields must put a
full barrier between the two (virtio 1.2, 2.7.10 "Used Buffer Notification
Suppression" and 2.7.13.3 "Device-side" ordering); otherwise both sides can
decide the other will notify and a queue stalls.

The fence is one C function (``__atomic_thread_fence(__ATOMIC_SEQ_CST)``) in
the VMM's compiled cffi module; it is taken straight from there, so the
virtqueue code needs nothing of the KVM wrappers in ``katapy.vmm.kvm``.
"""
from __future__ import annotations

try:
    from katapy.vmm._kvm_ioctl import lib  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "katapy.vmm._kvm_ioctl is not built: run `make cffi` "
        "(cd csrc/kvm_ioctl && ../../.venv/bin/python build.py)"
    ) from exc

full_barrier = lib.katapy_full_barrier
