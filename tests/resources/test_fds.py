"""katapy.linux.fds: the note an error gets when the shim is at its file-descriptor limit."""
from __future__ import annotations

import errno
import os
import resource

from katapy.linux.fds import exhaustion_note


def test_far_from_the_limit_there_is_no_note_unless_the_error_is_emfile():
    assert exhaustion_note() == ""
    note = exhaustion_note(error=OSError(errno.EMFILE, "Too many open files"))
    assert "too many open files" in note and "RLIMIT_NOFILE" in note
    assert exhaustion_note(error=OSError(errno.ENOSPC, "No space left on device")) == ""


def test_near_the_soft_limit_the_note_counts_the_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 4, hard))  # lowering a soft limit needs no privilege
    try:
        note = exhaustion_note()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert f"of its soft RLIMIT_NOFILE {used + 4}" in note, note
