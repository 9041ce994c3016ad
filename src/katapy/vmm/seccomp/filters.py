"""The allow-lists, one per thread class, each syscall with the reason it is there.

Derived from what the threads really call (docs/hypervisor.md, "Seccomp"):
the VMM's tests (tests/vmm, tests/virtio: flat guests on real vCPU threads,
every device's unit tests) run under ``strace -ff`` with filtering off, and
``python -m katapy.vmm.seccomp.derive`` lists per thread class what was called
after the thread named itself; then the code paths a test does not reach were
read (the virtio-fs server's FUSE opcodes, the tap calls, error paths that
log a traceback) and added with their reason.  A syscall is here because a
named piece of katapy, Python or glibc makes it on that thread, never "just
in case".

Both classes run Python, so both carry what the interpreter needs on any
thread: the GIL and every lock are futexes; the allocator maps, unmaps and
advises; a thread that ends unmaps its stack and calls exit; a logged
exception formats a traceback, which reads the source files (read-only
opens); garbage collection runs finalizers, which close fds, on whatever
thread happens to allocate.

Not here, on purpose: execve/fork/clone (nothing on these threads starts a
thread or a process, so no filter is ever inherited by one, and a
compromised thread cannot start one), ptrace, mount, the *id and
capability calls, bpf, perf_event_open, keyctl, and every socket family but
AF_UNIX.
"""
from __future__ import annotations

import enum

from katapy.vmm.seccomp._ffi import lib
from katapy.vmm.seccomp.bpf import Rule, allow


class ThreadClass(enum.Enum):
    """Which list a thread loads: its job, not its name."""

    VCPU = "vcpu"  # katapy.vmm.vcpu.VcpuThread: KVM_RUN and the exits' device emulation
    DEVICES = "devices"  # katapy.vmm.eventloop.EventLoop: every virtio device's queues and back ends

#: the trap handler's own calls: on every list, or a violation could not be reported
REPORT = allow("write", "exit_group")

#: what CPython and glibc do on any thread, whatever katapy code runs there
PYTHON = allow(
    "futex",  # the GIL, threading.Lock/Condition/Event, glibc's malloc arenas
    "mmap", "munmap", "mremap", "madvise", "mprotect", "brk",  # pymalloc arenas, glibc malloc and realloc
    "rt_sigprocmask", "rt_sigreturn",  # signal delivery (the vCPU kick) and glibc's masks around it
    "clock_gettime",  # time.monotonic/time.time when the vDSO falls back to the syscall
    "sched_yield",  # glibc's lock back-off
    "getpid", "gettid",  # logging, os.getpid(), threading's native ids
    "exit",  # the thread's end (glibc unmaps and advises its stack first: munmap, madvise)
    "close",  # finalizers (a socket or file collected on this thread) and the paths below
    "read", "lseek", "newfstatat",  # reading a source file for a logged traceback (linecache)
)

#: opens for reading only (a traceback's source lines, a lazy import): no write, create, truncate, append
READ_ONLY_OPEN = Rule("openat", arg=2, mask_clear=lib.O_ACCMODE | lib.O_CREAT | lib.O_TRUNC | lib.O_APPEND)


def _vcpu(pid: int) -> list[Rule]:
    return [
        # first, the hot path: one KVM_RUN per exit.  The other requests: KVM_GET_REGS (the rip in an
        # internal-error report), KVM_SET_GSI_ROUTING (a guest write to katapy's IOAPIC reprograms its
        # MSI routes, split irqchip), TCGETS (Python's open() asks isatty, for a traceback's source)
        Rule("ioctl", arg=1, values=(lib.KVM_RUN, lib.KVM_GET_REGS, lib.KVM_SET_GSI_ROUTING, lib.TCGETS)),
        *REPORT,
        *PYTHON,
        READ_ONLY_OPEN,
        # the vCPU that ends the VM kicks the others (pthread_kill: tgkill, on this process only)
        Rule("tgkill", arg=0, values=(pid,)),
        # read and write (above) also serve the eventfds: the serial port's irqfd (os.eventfd_write), the
        # legacy devices' eventfd reads, the event loop's wake-up pipe (EventLoop.call_soon, from a
        # virtio-mmio status write that activates a device on the loop thread), the serial log file
    ]


def _devices(pid: int) -> list[Rule]:
    return [
        *allow("epoll_wait", "epoll_pwait"),  # the loop itself (select.epoll.poll)
        *allow("epoll_ctl"),  # EventLoop.add/modify/remove from callbacks (vsock connections come and go)
        Rule("ioctl", arg=1, values=(
            lib.FIONBIO,  # socket.setblocking / a SOCK_NONBLOCK socket's init (vsock)
            lib.FIONREAD,  # bytes waiting on a socket (vsock credit)
            lib.FIOCLEX,  # os.set_inheritable(False)
            lib.TCGETS,  # Python's open() asks isatty
            lib.TUNSETVNETHDRSZ, lib.TUNSETOFFLOAD, lib.TUNGETIFF,  # the tap, on net feature negotiation
        )),
        *REPORT,
        *PYTHON,
        Rule("tgkill", arg=0, values=(pid,)),  # Vmm._vm_exit from a device callback kicks the vCPUs
        *allow(
            # queues: ioeventfd kicks are read, irqfd interrupts are written; the loop's wake-up pipe
            "readv", "writev",  # the tap (os.read/os.write may be vectored in glibc) and the log
            # virtio-blk (blk/image.py): data straight between the image and guest RAM, flush, discard
            "preadv", "preadv2", "pwritev", "pwritev2", "pread64", "pwrite64",
            "fsync", "fdatasync", "fallocate",
            # virtio-vsock (vsock/muxer.py, connection.py): host and guest streams over AF_UNIX
            "accept4", "connect", "shutdown", "getsockname", "getpeername", "getsockopt", "setsockopt",
            "sendto", "recvfrom", "sendmsg", "recvmsg",
            "poll", "ppoll",  # a socket with a timeout waits in poll
            "timerfd_create", "timerfd_settime", "timerfd_gettime",  # the vsock credit/timeout timer (timer.py)
            "fcntl", "dup", "dup3",  # os.scandir(fd) and FLUSH duplicate an fd; O_NONBLOCK flips
            # virtio-fs passthrough (fs/passthrough.py, inodes.py, resolve.py): every FUSE opcode it serves
            "openat2",  # lookups confined below the shared dir (RESOLVE_BENEATH)
            "getdents64",  # READDIR, READDIRPLUS (os.scandir)
            "mkdirat", "mknodat", "symlinkat", "unlinkat", "linkat", "readlinkat",
            "renameat2", "renameat",  # RENAME(2): glibc's renameat2() with flags 0 makes renameat(2)
            "chmod", "fchmodat", "fchownat",  # SETATTR: os.chmod of the inode's /proc/self/fd link is chmod(2)
            "utimensat", "ftruncate", "truncate",
            "statfs", "fstatfs",
            "setxattr", "getxattr", "listxattr", "removexattr",
            "faccessat", "faccessat2",  # ACCESS
            "syncfs",  # SYNCFS: of the share only
        ),
        # the vhost-user back end (vhost_user/server.py) runs on an EventLoop of its own and so gets this
        # list: the front end's connection (accept4), its fds (recvmsg SCM_RIGHTS), the guest memory it
        # shares (mmap of a memfd: mmap, above) -- nothing beyond the built-in VMM's devices' calls
        Rule("socket", arg=0, values=(lib.AF_UNIX,)),  # vsock: a guest connect opens <uds>_<port>
        *allow("unlink"),  # vsock: the device's close (on the loop) removes its listening socket
        Rule("prlimit64", arg=0, values=(0,)),  # fs/fdlimit.py: RLIMIT_NOFILE of this process
        # any open: the fs server opens and creates files for the guest (CREATE is O_CREAT|O_EXCL)
        Rule("openat"),
    ]


def rules(cls: ThreadClass, pid: int) -> list[Rule]:
    """The allow-list of ``cls`` for a thread of process ``pid``."""
    if cls is ThreadClass.VCPU:
        return _vcpu(pid)
    if cls is ThreadClass.DEVICES:
        return _devices(pid)
    raise ValueError(f"no filter for {cls!r}")
