"""Installing a thread's filter, and the trap that reports a violation.

``install(ThreadClass.VCPU)`` is called by the thread itself once its setup
is done (the vCPU thread at the top of its run loop, the device thread when
its loop starts).  It

1. records the thread's name and tid for the report and sets the kernel's
   comm to the name (``katapy_seccomp_identify``: the trap handler can no
   longer ask, and ``top -H``/strace show which thread is which);
2. when filtering is on (``[hypervisor] seccomp``, :func:`configure`),
   installs the SIGSYS handler (process-wide, idempotent) pointed at the
   log's fd, compiles the class's allow-list and loads it on this thread
   only (seccomp(2) without SECCOMP_FILTER_FLAG_TSYNC).

What a violation does: the filter answers SECCOMP_RET_TRAP, the kernel sends
SIGSYS to the thread, the C handler writes one ``event='seccomp violation'``
line (syscall number and name, thread name, tid) to the log fd and ends the
process with :data:`EXIT_STATUS`.  Not SECCOMP_RET_KILL_THREAD: the VMM's
threads live in the shim's Python process, and a thread killed while it
holds the GIL (or a lock a vCPU waits on) would leave the shim hung, serving
nothing and reporting nothing.  Ending the process is what a compromised
VMM deserves, and containerd, seeing the shim gone, runs ``shim delete``,
which cleans the sandbox up as after any shim crash.

The one test seam: :data:`after_install`, None in production, is called on
the thread right after its filter is loaded; tests/vmm/test_seccomp.py sets it
in a child process to make a filtered thread call something off its list.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

from katapy import log
from katapy.vmm.seccomp import bpf
from katapy.vmm.seccomp._ffi import ffi, lib
from katapy.vmm.seccomp.filters import ThreadClass, rules

_log = log.get("vmm.seccomp")

#: the process's exit status after a violation: 128 + SIGSYS (31), what a shell reports for a process
#: killed by SIGSYS, so a supervisor that only sees the status still reads "bad system call"
EXIT_STATUS = 128 + 31


class SeccompError(OSError):
    """A filter could not be loaded (a kernel without seccomp filters, a rejected program)."""


_enabled = True
_lock = threading.Lock()

#: test seam (see the module docstring): called with the thread class on the thread, after its filter is on
after_install: Callable[[ThreadClass], None] | None = None


def configure(enabled: bool) -> None:
    """``[hypervisor] seccomp``: whether threads started from now on load their filters."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


def kernel_support() -> str | None:
    """None when this kernel has seccomp filters, else why not (/proc/self/status ``Seccomp:``)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError as exc:
        return f"cannot read /proc/self/status: {exc}"
    if "Seccomp" not in fields:
        return "the kernel has no CONFIG_SECCOMP (no Seccomp: line in /proc/self/status)"
    if "Seccomp_filters" not in fields and not os.path.exists("/proc/sys/kernel/seccomp/actions_avail"):
        return "the kernel has no CONFIG_SECCOMP_FILTER"
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            actions = f.read().split()
        if "trap" not in actions:
            return f"the kernel's seccomp has no trap action (actions_avail: {' '.join(actions)})"
    except OSError:
        pass
    return None


def thread_mode(tid: int | None = None) -> int:
    """The ``Seccomp:`` mode of a thread of this process (0 none, 1 strict, 2 filter)."""
    path = f"/proc/self/task/{tid}/status" if tid is not None else "/proc/thread-self/status"
    with open(path) as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0


def _log_fd() -> int:
    """The fd katapy's log lines go to (the shim's log FIFO; stderr when logging is not set up)."""
    import structlog

    stream = getattr(structlog.get_config().get("logger_factory"), "_file", None)
    fd = getattr(stream, "fd", None)  # katapy.log.FifoStream
    if isinstance(fd, int):
        return fd
    try:
        return stream.fileno()  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        return 2


def program(cls: ThreadClass) -> list[bpf.Insn]:
    """The BPF program a thread of class ``cls`` loads in this process."""
    return bpf.compile_rules(rules(cls, pid=os.getpid()))


def install(cls: ThreadClass) -> bool:
    """Load ``cls``'s filter on the calling thread (see the module docstring); False when filtering is off."""
    name = threading.current_thread().name
    lib.katapy_seccomp_identify(name.encode("utf-8", "replace")[:31])
    if not _enabled:
        return False
    prog = program(cls)
    fd = _log_fd()
    with _lock:
        r = lib.katapy_seccomp_install_trap(fd, EXIT_STATUS)
    if r < 0:
        raise SeccompError(-r, f"sigaction(SIGSYS): {os.strerror(-r)}")
    buf = ffi.new("struct sock_filter[]", len(prog))
    ffi.memmove(buf, bpf.to_bytes(prog), len(prog) * ffi.sizeof("struct sock_filter"))
    _log.debug("seccomp filter loading", thread=name, thread_class=cls.value, instructions=len(prog), log_fd=fd)
    r = lib.katapy_seccomp_load(buf, len(prog))
    if r < 0:
        raise SeccompError(-r, f"seccomp(SECCOMP_SET_MODE_FILTER) for {name}: {os.strerror(-r)}")
    hook = after_install
    if hook is not None:
        hook(cls)
    return True
