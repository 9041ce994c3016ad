"""cffi (API mode) build of ``katapy.vmm._kvm_ioctl``: the KVM structs and ioctls katapy uses.

Run ``cd csrc/kvm_ioctl && ../../.venv/bin/python build.py`` to compile the
extension into ``src/katapy/vmm/``; setup.py imports ``ffibuilder`` from here
through ``cffi_modules``.

API mode means the C compiler, not this file, decides struct layouts and ioctl
numbers: the cdef below only names what Python needs, and ``...`` lets the
compiler fill in the rest from <linux/kvm.h>.  Every wrapper is an ordinary C
function, so cffi releases the GIL around it (its default): a vCPU thread in
KVM_RUN never blocks the rest of the VMM.

Only ``katapy.vmm.kvm`` imports the result.
"""
from __future__ import annotations

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ffibuilder = FFI()

ffibuilder.cdef(
    r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;

/* --- ioctl numbers (Documentation/virt/kvm/api.rst section 4) --- */
#define KVMIO ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_SIGNAL_MSI ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_ENABLE_CAP ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...

/* --- capabilities --- */
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_TSC_DEADLINE_TIMER ...
#define KVM_CAP_SPLIT_IRQCHIP ...

/* --- exit reasons (struct kvm_run.exit_reason) --- */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IOAPIC_EOI ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...

#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_MEM_READONLY ...

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        struct { __u8 vector; } eoi;
        char padding[256];
    };
    ...;
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8 type;
    __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable;
    ...;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[...];
};

struct kvm_fpu {
    __u8 fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8 ftwx;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8 xmm[16][16];
    __u32 mxcsr;
    ...;
};

struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax, ebx, ecx, edx;
    ...;
};
struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };
#define KVM_CPUID_FLAG_SIGNIFCANT_INDEX ...

struct kvm_lapic_state { char regs[...]; };

struct kvm_mp_state { __u32 mp_state; };

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };

struct kvm_ioeventfd {
    __u64 datamatch;
    __u64 addr;
    __u32 len;
    __s32 fd;
    __u32 flags;
    ...;
};

struct kvm_pit_config { __u32 flags; ...; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_irq_level { __u32 irq; __u32 level; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid; ...; };

struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 pad; };
struct kvm_irq_routing_entry {
    __u32 gsi;
    __u32 type;
    __u32 flags;
    __u32 pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        __u32 pad[8];
    } u;
    ...;
};
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; };

/* --- wrappers: return the ioctl result, or -errno --- */
long katapy_ioctl(int fd, unsigned long request, unsigned long arg);
long katapy_ioctl_ptr(int fd, unsigned long request, void *arg);
long katapy_kvm_run(int vcpu_fd);
void *katapy_mmap_shared(int fd, size_t size);
int katapy_munmap(void *addr, size_t size);
int katapy_install_kick_handler(int signo);
int katapy_eventfd(unsigned int initval, int flags);
void katapy_full_barrier(void);
#define EFD_CLOEXEC ...
#define EFD_NONBLOCK ...
"""
)

ffibuilder.set_source(
    "katapy.vmm._kvm_ioctl",
    r"""
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <linux/kvm.h>

static long katapy_ioctl(int fd, unsigned long request, unsigned long arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static long katapy_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* KVM_RUN: cffi drops the GIL around this call, so a vCPU can sit in the
   guest for as long as it likes while Python threads go on. */
static long katapy_kvm_run(int vcpu_fd)
{
    long r = ioctl(vcpu_fd, KVM_RUN, 0);
    return r < 0 ? -errno : r;
}

static void *katapy_mmap_shared(int fd, size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

static int katapy_munmap(void *addr, size_t size)
{
    return munmap(addr, size) < 0 ? -errno : 0;
}

/* The vCPU kick: a signal whose handler does nothing, installed without
   SA_RESTART so a thread in KVM_RUN returns EINTR (api.rst, KVM_RUN and
   kvm_run.immediate_exit).  Python's own handlers only run on the main
   thread, hence a C handler. */
static void katapy_kick_handler(int signo) { (void)signo; }

static int katapy_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = katapy_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

static int katapy_eventfd(unsigned int initval, int flags)
{
    int fd = eventfd(initval, flags);
    return fd < 0 ? -errno : fd;
}

/* A full memory barrier (mfence on x86): orders this thread's stores before
   its later loads, which x86's TSO does not (Intel SDM vol. 3A 9.2.2).  A
   virtio device needs it between publishing an index and reading the
   driver's notification-suppression fields (virtio 1.2, 2.7.10 and 2.7.13). */
static void katapy_full_barrier(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
""",
)


def main() -> None:
    """Compile into src/katapy/vmm/ (the package directory the module name points at)."""
    src = os.path.normpath(os.path.join(HERE, "..", "..", "src"))
    build_tmp = os.path.join(HERE, "build")
    os.makedirs(build_tmp, exist_ok=True)
    so = ffibuilder.compile(tmpdir=build_tmp, verbose=False)
    # compile() leaves the result under tmpdir/katapy/vmm/; move it next to the package.
    target = os.path.join(src, "katapy", "vmm", os.path.basename(so))
    os.replace(so, target)
    print(target)


if __name__ == "__main__":
    sys.exit(main())
