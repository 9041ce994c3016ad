"""A periodic timerfd for the device event loop (timerfd_create(2); Python 3.11 has no wrapper)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFd:
    """An fd that becomes readable every ``interval`` seconds while armed."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.fd = fd
        self.armed = False

    def arm(self, interval: float) -> None:
        sec, frac = int(interval), interval - int(interval)
        ts = _Timespec(sec, int(frac * 1e9))
        spec = _Itimerspec(ts, ts)
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.armed = interval > 0

    def disarm(self) -> None:
        self.arm(0)

    def consume(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
