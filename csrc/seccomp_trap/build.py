"""cffi (API mode) build of ``katapy.vmm._seccomp_trap``: load a seccomp filter on one thread, report a trap.

Run ``cd csrc/seccomp_trap && ../../.venv/bin/python build.py`` (``make cffi``
does) to compile the extension into ``src/katapy/vmm/``.

Three things live here because Python cannot do them:

* ``katapy_seccomp_load``: ``prctl(PR_SET_NO_NEW_PRIVS)`` and
  ``seccomp(SECCOMP_SET_MODE_FILTER)`` on the calling thread only (no
  SECCOMP_FILTER_FLAG_TSYNC: the other threads of the shim keep their own
  filters, or none).  Both are per-task in the kernel (seccomp(2),
  prctl(2) PR_SET_NO_NEW_PRIVS), so the rest of the process is untouched.
* the SIGSYS handler.  A filter returns SECCOMP_RET_TRAP for a syscall off
  its list; the kernel then delivers SIGSYS to the offending thread with
  ``si_syscall`` and ``si_arch`` set (seccomp(2), "SECCOMP_RET_TRAP").
  Python's own signal handlers run later, on the main thread, and never
  learn which thread or syscall it was; and the thread may hold the GIL.
  So the handler is C: it formats one log line into a stack buffer, writes
  it with write(2) to the shim's log fd and ends the whole process with
  ``_exit(status)`` (exit_group(2)).  Only write, exit_group and the vDSO
  clock are used, every one of them on each filter's list; nothing in it
  allocates, locks or opens a file.
* the syscall table: the name/number pairs of this machine's
  <asm/unistd.h>, compiled in so that the filters in Python and the report
  in the handler use the kernel headers' numbers, not a hand-copied list.

The thread's name and id are stored per thread (``__thread``) by
``katapy_seccomp_identify`` before its filter is loaded: the handler cannot
call gettid or read /proc once the filter is on.  The first touch of a
``__thread`` variable in a dlopen()ed library may allocate; identify()
touches both, so the handler's later reads never do.

Only ``katapy.vmm.seccomp`` imports the result.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _syscall_names() -> list[str]:
    """Every ``__NR_*`` the C compiler sees in <asm/unistd.h> (x86_64: asm/unistd_64.h)."""
    cc = os.environ.get("CC", "cc")
    out = subprocess.run([cc, "-dM", "-E", "-"], input="#include <asm/unistd.h>\n",
                         capture_output=True, text=True, check=True).stdout
    return sorted(set(re.findall(r"^#define __NR_(\w+) ", out, re.M)))


ffibuilder = FFI()

ffibuilder.cdef(
    r"""
#define SECCOMP_RET_ALLOW ...
#define SECCOMP_RET_TRAP ...
#define SECCOMP_RET_KILL_PROCESS ...
#define SECCOMP_RET_ERRNO ...
#define AUDIT_ARCH_X86_64 ...
#define AUDIT_ARCH_I386 ...
#define __X32_SYSCALL_BIT ...

/* ioctl requests the filters allow by number (the vCPU's KVM calls, the devices' tap and socket calls) */
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_SIGNAL_MSI ...
#define KVM_IRQ_LINE ...
#define TUNSETVNETHDRSZ ...
#define TUNSETOFFLOAD ...
#define TUNGETIFF ...
#define TCGETS ...
#define FIONBIO ...
#define FIONREAD ...
#define FIOCLEX ...
#define AF_UNIX ...
#define O_ACCMODE ...
#define O_CREAT ...
#define O_TRUNC ...
#define O_APPEND ...
#define O_PATH ...

struct sock_filter { unsigned short code; unsigned char jt; unsigned char jf; unsigned int k; };

/* the compiled-in <asm/unistd.h> table */
int katapy_syscall_count(void);
const char *katapy_syscall_name_at(int i);
int katapy_syscall_nr_at(int i);

/* the SIGSYS handler: process-wide, installed once; returns 0 or -errno */
int katapy_seccomp_install_trap(int log_fd, int exit_status);
/* this thread's name (truncated to 31 bytes) and tid for the report; sets the kernel's comm too */
int katapy_seccomp_identify(const char *name);
/* load a filter on this thread only; returns 0 or -errno */
int katapy_seccomp_load(const struct sock_filter *prog, unsigned short len);
/* the Seccomp: mode of this thread as prctl(PR_GET_SECCOMP) reports it (0, 1, 2) or -errno */
int katapy_seccomp_mode(void);
"""
)

_TABLE = ",\n".join(f'    {{__NR_{n}, "{n}"}}' for n in _syscall_names())

ffibuilder.set_source(
    "katapy.vmm._seccomp_trap",
    r"""
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <asm/unistd.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <linux/if_tun.h>
#include <linux/kvm.h>

#ifndef SYS_SECCOMP
#define SYS_SECCOMP 1  /* si_code of a seccomp SIGSYS (siginfo.h); glibc hides it behind __USE_GNU */
#endif
#ifndef __X32_SYSCALL_BIT
#define __X32_SYSCALL_BIT 0x40000000
#endif

struct katapy_syscall { int nr; const char *name; };
static const struct katapy_syscall katapy_syscalls[] = {
"""
    + _TABLE
    + r"""
};
#define KATAPY_NSYSCALLS ((int)(sizeof(katapy_syscalls) / sizeof(katapy_syscalls[0])))

static int katapy_syscall_count(void) { return KATAPY_NSYSCALLS; }
static const char *katapy_syscall_name_at(int i) { return katapy_syscalls[i].name; }
static int katapy_syscall_nr_at(int i) { return katapy_syscalls[i].nr; }

static volatile int trap_log_fd = 2;
static volatile int trap_exit_status = 159;
static __thread char thread_label[32];
static __thread long thread_tid;

/* --- a tiny async-signal-safe formatter into a fixed buffer --- */
struct line { char buf[512]; size_t len; };

static void put(struct line *l, const char *s)
{
    while (*s && l->len < sizeof(l->buf) - 1)
        l->buf[l->len++] = *s++;
}

static void put_uint(struct line *l, unsigned long v, int width)
{
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v && n < 24);
    while (n < width && n < 24) tmp[n++] = '0';
    while (n > 0 && l->len < sizeof(l->buf) - 1) l->buf[l->len++] = tmp[--n];
}

static void put_int(struct line *l, long v)
{
    if (v < 0) { put(l, "-"); put_uint(l, (unsigned long)-v, 1); }
    else put_uint(l, (unsigned long)v, 1);
}

static void put_hex(struct line *l, unsigned long v)
{
    char tmp[17];
    int n = 0;
    do { tmp[n++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v && n < 16);
    put(l, "0x");
    while (n > 0 && l->len < sizeof(l->buf) - 1) l->buf[l->len++] = tmp[--n];
}

/* UTC calendar date of a day count since 1970-01-01 (the civil-from-days algorithm, proleptic
   Gregorian): gmtime_r is not on POSIX's async-signal-safe list. */
static void put_time(struct line *l)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) { put(l, "time='?'"); return; }
    long days = ts.tv_sec / 86400, secs = ts.tv_sec % 86400;
    long z = days + 719468, era = (z >= 0 ? z : z - 146096) / 146097;
    long doe = z - era * 146097;
    long yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    long y = yoe + era * 400, doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    long mp = (5 * doy + 2) / 153, d = doy - (153 * mp + 2) / 5 + 1, m = mp < 10 ? mp + 3 : mp - 9;
    put(l, "time='");
    put_uint(l, (unsigned long)(y + (m <= 2)), 4); put(l, "-");
    put_uint(l, (unsigned long)m, 2); put(l, "-");
    put_uint(l, (unsigned long)d, 2); put(l, "T");
    put_uint(l, (unsigned long)(secs / 3600), 2); put(l, ":");
    put_uint(l, (unsigned long)(secs / 60 % 60), 2); put(l, ":");
    put_uint(l, (unsigned long)(secs % 60), 2); put(l, ".");
    put_uint(l, (unsigned long)(ts.tv_nsec / 1000), 6); put(l, "Z'");
}

static const char *syscall_name(int nr)
{
    for (int i = 0; i < KATAPY_NSYSCALLS; i++)
        if (katapy_syscalls[i].nr == nr)
            return katapy_syscalls[i].name;
    return "?";
}

/* The line has katapy's log format (katapy.log: time, level, event, then the other keys sorted),
   so it reads like every other line of the shim's log. */
static void katapy_sigsys(int signo, siginfo_t *info, void *uctx)
{
    (void)signo; (void)uctx;
    struct line l;
    l.len = 0;
    int from_seccomp = info->si_code == SYS_SECCOMP;
    int nr = from_seccomp ? info->si_syscall : -1;
    unsigned int arch = from_seccomp ? info->si_arch : 0;
    put_time(&l);
    put(&l, " level='error' event='seccomp violation' arch=");
    if (arch == AUDIT_ARCH_X86_64 && !(nr & __X32_SYSCALL_BIT)) put(&l, "'x86_64'");
    else if (arch == AUDIT_ARCH_X86_64) put(&l, "'x32'");
    else { put(&l, "'"); put_hex(&l, arch); put(&l, "'"); }
    put(&l, " component='vmm.seccomp' exit_status=");
    put_int(&l, trap_exit_status);
    put(&l, " syscall=");
    put_int(&l, nr);
    put(&l, " syscall_name='");
    put(&l, arch == AUDIT_ARCH_X86_64 && nr >= 0 ? syscall_name(nr) : "?");
    put(&l, "' thread='");
    put(&l, thread_label[0] ? thread_label : "?");
    put(&l, "' tid=");
    put_int(&l, thread_tid);
    put(&l, "\n");
    size_t off = 0;
    while (off < l.len) {
        ssize_t n = write(trap_log_fd, l.buf + off, l.len - off);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            break;
        }
        off += (size_t)n;
    }
    _exit(trap_exit_status);
}

static int katapy_seccomp_install_trap(int log_fd, int exit_status)
{
    struct sigaction sa;
    trap_log_fd = log_fd;
    trap_exit_status = exit_status;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = katapy_sigsys;
    sigfillset(&sa.sa_mask);  /* nothing else runs on this thread while it reports */
    sa.sa_flags = SA_SIGINFO;
    return sigaction(SIGSYS, &sa, NULL) < 0 ? -errno : 0;
}

static int katapy_seccomp_identify(const char *name)
{
    size_t n = strlen(name);
    if (n > sizeof(thread_label) - 1) n = sizeof(thread_label) - 1;
    memcpy(thread_label, name, n);
    thread_label[n] = 0;
    thread_tid = syscall(SYS_gettid);
    /* the kernel's comm (15 bytes), seen in /proc/<pid>/task/<tid>/comm, top -H and strace logs */
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0) < 0 ? -errno : 0;
}

static int katapy_seccomp_load(const struct sock_filter *prog, unsigned short len)
{
    struct sock_fprog fprog;
    fprog.len = len;
    fprog.filter = (struct sock_filter *)prog;
    /* without CAP_SYS_ADMIN the kernel wants no_new_privs first; it is per thread as well */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) < 0)
        return -errno;
    return 0;
}

static int katapy_seccomp_mode(void)
{
    int r = prctl(PR_GET_SECCOMP, 0, 0, 0, 0);
    return r < 0 ? -errno : r;
}
""",
)


def main() -> None:
    """Compile into src/katapy/vmm/ (the package directory the module name points at)."""
    src = os.path.normpath(os.path.join(HERE, "..", "..", "src"))
    build_tmp = os.path.join(HERE, "build")
    os.makedirs(build_tmp, exist_ok=True)
    so = ffibuilder.compile(tmpdir=build_tmp, verbose=False)
    target = os.path.join(src, "katapy", "vmm", os.path.basename(so))
    os.replace(so, target)
    print(target)


if __name__ == "__main__":
    sys.exit(main())
