"""The compiled cffi module and errno handling; nothing outside ``katapy.vmm.kvm`` imports this.

(``katapy.vmm.barrier`` takes its one C function, the memory fence, from the compiled module itself, so that
the virtqueues need none of the KVM wrappers.)
"""
from __future__ import annotations

import errno as _errno
import os

try:
    from katapy.vmm._kvm_ioctl import ffi, lib  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "katapy.vmm._kvm_ioctl is not built: run `make cffi` "
        "(cd csrc/kvm_ioctl && ../../.venv/bin/python build.py)"
    ) from exc

__all__ = ["ffi", "lib", "KvmError", "check"]


class KvmError(OSError):
    """A KVM ioctl failed; ``errno`` and the ioctl's name are kept."""

    def __init__(self, err: int, what: str):
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


def check(ret: int, what: str) -> int:
    """Turn a wrapper's ``-errno`` convention into an exception."""
    if ret < 0:
        raise KvmError(-ret, what)
    return ret


EINTR = _errno.EINTR
EAGAIN = _errno.EAGAIN
