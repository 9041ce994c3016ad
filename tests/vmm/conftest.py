"""Shared fixtures for the VMM tests: real /dev/kvm (kvm-pvm is enough for tiny guests)."""
from __future__ import annotations

import os
import threading
import time

import pytest


def _kvm_usable() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    try:
        import katapy.vmm.kvm._ffi  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


@pytest.fixture
def kvm_required():
    why = _kvm_usable()
    if why:
        pytest.skip(why)


class SerialCapture:
    """Collects COM1 output from vCPU threads; lets a test wait for bytes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        with self._cond:
            self.data += chunk
            self._cond.notify_all()

    def wait_for(self, needle: bytes, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self.data:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


@pytest.fixture
def vmm(kvm_required):
    from katapy.vmm.api import Vmm

    v = Vmm()
    yield v
    v.stop()
