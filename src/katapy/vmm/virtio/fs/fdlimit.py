"""The open-file budget of the in-process virtio-fs server (RLIMIT_NOFILE).

The passthrough server holds one ``O_PATH`` fd per inode the guest kernel has
looked up and not yet forgotten (FUSE_FORGET comes only under the guest's
memory pressure or on unmount), plus one per open file or directory handle.
A guest that lists a directory of 10,000 entries with READDIRPLUS makes us
hold over 10,000 fds, while a process started by a plain init gets a soft
limit of 1024 (hard 4096).  So, when the device is activated, the process's
soft limit is raised to its hard limit, and the hard limit itself up to
:data:`NOFILE_TARGET` (bounded by ``/proc/sys/fs/nr_open``) where the process
may (CAP_SYS_RESOURCE).  Past the limit the guest still gets EMFILE for the
request that needed one more fd; nothing else fails.
"""
from __future__ import annotations

import resource

from katapy import log

_log = log.get("vmm.virtio.fs")

#: The open-file limit the fs server asks for.
NOFILE_TARGET = 1 << 20
NR_OPEN = "/proc/sys/fs/nr_open"


def _nr_open() -> int:
    try:
        with open(NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return NOFILE_TARGET


def raise_nofile_limit(target: int = NOFILE_TARGET) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE towards ``target`` as far as this process may; returns the (soft, hard) in force."""
    soft, hard = before = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    want = min(target, _nr_open())
    if soft == inf or soft >= want:
        return before
    if hard == inf or hard >= want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # needs CAP_SYS_RESOURCE
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)
    _log.info("RLIMIT_NOFILE raised for the virtio-fs server", before=f"{soft}/{hard}", after=f"{now[0]}/{now[1]}")
    return now
