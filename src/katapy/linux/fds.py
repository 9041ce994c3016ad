"""The shim's own file descriptors against its soft RLIMIT_NOFILE, for errors that would otherwise hide why.

A shim near its limit fails in places that name something else: QEMU's
vhost-user set-up ("Invalid argument" once the back ends cannot take the fds
QEMU sends), an import, an accept.  :func:`exhaustion_note` is appended to
such an error so the operator reads the cause (getrlimit(2), proc(5)
``/proc/self/fd``).
"""
from __future__ import annotations

import errno
import os
import resource


def exhaustion_note(margin: int = 8, error: OSError | None = None) -> str:
    """`` (too many open files: ...)`` when this process is within ``margin`` descriptors of its soft
    RLIMIT_NOFILE, or ``error`` is EMFILE/ENFILE (the fds may be released by the time it is reported),
    else ""."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return ""
    hit = error is not None and error.errno in (errno.EMFILE, errno.ENFILE)
    if not hit and (soft == resource.RLIM_INFINITY or used < soft - margin):
        return ""
    return f" (too many open files: the shim has {used} descriptors open of its soft RLIMIT_NOFILE {soft})"
