"""KVM constants other modules need, without exposing cffi (values come from <linux/kvm.h> via the build)."""
from katapy.vmm.kvm._ffi import lib

KVM_CAP_IRQCHIP = lib.KVM_CAP_IRQCHIP
KVM_CAP_IRQFD = lib.KVM_CAP_IRQFD
KVM_CAP_IOEVENTFD = lib.KVM_CAP_IOEVENTFD
KVM_CAP_PIT2 = lib.KVM_CAP_PIT2
KVM_CAP_SIGNAL_MSI = lib.KVM_CAP_SIGNAL_MSI
KVM_CAP_IMMEDIATE_EXIT = lib.KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_SET_TSS_ADDR = lib.KVM_CAP_SET_TSS_ADDR
KVM_CAP_SET_IDENTITY_MAP_ADDR = lib.KVM_CAP_SET_IDENTITY_MAP_ADDR
KVM_CAP_TSC_DEADLINE_TIMER = lib.KVM_CAP_TSC_DEADLINE_TIMER
KVM_CAP_IRQ_ROUTING = lib.KVM_CAP_IRQ_ROUTING
KVM_CAP_NR_MEMSLOTS = lib.KVM_CAP_NR_MEMSLOTS
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
KVM_SYSTEM_EVENT_SHUTDOWN = lib.KVM_SYSTEM_EVENT_SHUTDOWN
KVM_SYSTEM_EVENT_RESET = lib.KVM_SYSTEM_EVENT_RESET
KVM_SYSTEM_EVENT_CRASH = lib.KVM_SYSTEM_EVENT_CRASH
KVM_MP_STATE_RUNNABLE = lib.KVM_MP_STATE_RUNNABLE
KVM_MP_STATE_UNINITIALIZED = lib.KVM_MP_STATE_UNINITIALIZED


def install_kick_signal(signo: int) -> None:
    """Install the no-op C handler for the vCPU kick signal (see vmm/vcpu.py)."""
    from katapy.vmm.kvm._ffi import check

    check(lib.katapy_install_kick_handler(signo), "sigaction(kick signal)")
