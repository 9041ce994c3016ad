"""Seccomp filters for the built-in VMM's threads, one allow-list per thread class.

The VMM's threads live in the shim's process; each loads its own filter once
its setup is done (:func:`install`), so a guest that takes over a vCPU or a
device thread finds only the syscalls that thread needs.  See
docs/hypervisor.md, "Seccomp", for the design and how the lists were derived.

``bpf``      allow-lists to classic BPF (and a small evaluator for tests)
``filters``  the allow-lists per thread class, with why each syscall is there
``installer`` configuration, the per-thread installer, the SIGSYS report
``derive``   ``python -m katapy.vmm.seccomp.derive LOG``: syscalls per thread from an strace log
"""
from katapy.vmm.seccomp.installer import (
    EXIT_STATUS,
    SeccompError,
    ThreadClass,
    configure,
    enabled,
    install,
    kernel_support,
    program,
    thread_mode,
)

__all__ = [
    "EXIT_STATUS", "SeccompError", "ThreadClass", "configure", "enabled", "install", "kernel_support",
    "program", "thread_mode",
]
