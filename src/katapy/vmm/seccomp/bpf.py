"""Allow-lists to classic BPF: the seccomp program one thread class loads (seccomp(2), filter.txt).

The program reads ``struct seccomp_data`` (<linux/seccomp.h>)::

    struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; };

and answers SECCOMP_RET_ALLOW or SECCOMP_RET_TRAP.  Its shape, for an
allow-list ``[read, ioctl(request in {A, B}), ...]``::

    ld  arch          ; anything but x86_64 (an int 0x80 i386 call) traps
    jeq AUDIT_ARCH_X86_64 ? skip : trap
    ld  nr
    jge __X32_SYSCALL_BIT ? trap : skip      ; x32 syscalls share the arch value
    jeq __NR_read ? allow : next             ; one pair per plain syscall
    jeq __NR_ioctl ? args : next             ; a syscall restricted by one argument
      ld  args[1] (low 32 bits)
      jeq A ? allow : next / jeq B ? allow : next / ret TRAP
    ...
    ret TRAP

Each syscall's test is ``jeq nr, 0, k`` followed by its own ``ret``, so no
jump is longer than one block (cBPF's jt/jf are 8 bits) whatever the list's
length; the lists are short enough (< 150 rules, < 400 instructions, the
kernel's limit is 4096) that a linear scan costs less than the syscall.
The first rules are the hot ones (a vCPU's ioctl(KVM_RUN), futex).

Arguments are compared on their low 32 bits only: every argument a rule
restricts is an ``int`` or ``unsigned int`` in the kernel's prototype
(ioctl's ``cmd``, socket's ``family``, tgkill's ``tgid``, openat's
``flags``), so the kernel itself never looks at the upper half.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from katapy.vmm.seccomp._ffi import ffi, lib

# <linux/bpf_common.h>
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x04, 0x05, 0x06
BPF_W, BPF_ABS, BPF_K = 0x00, 0x20, 0x00
BPF_JEQ, BPF_JGE, BPF_JSET = 0x10, 0x30, 0x40

LD_ABS = BPF_LD | BPF_W | BPF_ABS
JEQ = BPF_JMP | BPF_JEQ | BPF_K
JGE = BPF_JMP | BPF_JGE | BPF_K
JSET = BPF_JMP | BPF_JSET | BPF_K
RET = BPF_RET | BPF_K

# struct seccomp_data offsets (little-endian x86_64: an argument's low half comes first)
OFF_NR, OFF_ARCH = 0, 4
def OFF_ARG_LO(i: int) -> int: return 16 + 8 * i  # noqa: E704

RET_ALLOW = lib.SECCOMP_RET_ALLOW
RET_TRAP = lib.SECCOMP_RET_TRAP
AUDIT_ARCH_X86_64 = lib.AUDIT_ARCH_X86_64
AUDIT_ARCH_I386 = lib.AUDIT_ARCH_I386
X32_SYSCALL_BIT = lib.__X32_SYSCALL_BIT


class UnknownSyscall(KeyError):
    """A name on an allow-list that this machine's <asm/unistd.h> does not have."""


@functools.cache
def syscall_table() -> dict[str, int]:
    """name -> number, from the <asm/unistd.h> compiled into katapy.vmm._seccomp_trap."""
    return {ffi.string(lib.katapy_syscall_name_at(i)).decode(): lib.katapy_syscall_nr_at(i)
            for i in range(lib.katapy_syscall_count())}


def syscall_nr(name: str) -> int:
    try:
        return syscall_table()[name]
    except KeyError:
        raise UnknownSyscall(f"{name}: not a syscall of this kernel's x86_64 table") from None


def syscall_name(nr: int) -> str:
    return next((n for n, v in syscall_table().items() if v == nr), f"#{nr}")


@dataclass(frozen=True)
class Rule:
    """Allow syscall ``name``; with ``arg`` set, only when that argument is one of ``values``
    (``mask_clear`` instead: only when none of the mask's bits are set in it)."""

    name: str
    arg: int | None = None
    values: tuple[int, ...] = ()
    mask_clear: int | None = None

    def __post_init__(self) -> None:
        if self.arg is not None and not 0 <= self.arg < 6:
            raise ValueError(f"{self.name}: argument index {self.arg} out of 0..5")
        if self.arg is not None and not self.values and self.mask_clear is None:
            raise ValueError(f"{self.name}: an argument rule needs values or mask_clear")
        if len(self.values) > 100:
            raise ValueError(f"{self.name}: too many values for one block")


def allow(*names: str) -> list[Rule]:
    return [Rule(n) for n in names]


Insn = tuple[int, int, int, int]  # code, jt, jf, k


def compile_rules(rules: list[Rule]) -> list[Insn]:
    """The program for one allow-list (see the module docstring); duplicate names are an error."""
    seen: set[str] = set()
    prog: list[Insn] = [
        (LD_ABS, 0, 0, OFF_ARCH),
        (JEQ, 1, 0, AUDIT_ARCH_X86_64),
        (RET, 0, 0, RET_TRAP),
        (LD_ABS, 0, 0, OFF_NR),
        (JGE, 0, 1, X32_SYSCALL_BIT),
        (RET, 0, 0, RET_TRAP),
    ]
    for r in rules:
        if r.name in seen:
            raise ValueError(f"{r.name}: listed twice")
        seen.add(r.name)
        nr = syscall_nr(r.name)
        if r.arg is None:
            prog += [(JEQ, 0, 1, nr), (RET, 0, 0, RET_ALLOW)]
            continue
        block: list[Insn] = [(LD_ABS, 0, 0, OFF_ARG_LO(r.arg))]
        if r.mask_clear is not None:
            block += [(JSET, 1, 0, r.mask_clear), (RET, 0, 0, RET_ALLOW)]
        else:
            for v in r.values:
                block += [(JEQ, 0, 1, v & 0xFFFFFFFF), (RET, 0, 0, RET_ALLOW)]
        block.append((RET, 0, 0, RET_TRAP))  # the A register now holds an argument: never fall through
        prog += [(JEQ, 0, len(block), nr), *block]
    prog.append((RET, 0, 0, RET_TRAP))
    if len(prog) > 4096:  # BPF_MAXINSNS
        raise ValueError(f"filter has {len(prog)} instructions, the kernel takes 4096")
    return prog


def to_bytes(prog: list[Insn]) -> bytes:
    """The program as an array of ``struct sock_filter`` (what ``struct sock_fprog.filter`` points at)."""
    return b"".join(struct.pack("<HBBI", *insn) for insn in prog)


def run(prog: list[Insn], nr: int, args: tuple[int, ...] = (), arch: int = AUDIT_ARCH_X86_64) -> int:
    """Evaluate the program on one ``seccomp_data`` as the kernel would (the subset compile_rules emits):
    for tests and for ``katapy check``, not used on the install path."""
    a6 = (tuple(args) + (0,) * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(x & 0xFFFFFFFFFFFFFFFF for x in a6))
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == LD_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == RET:
            return k
        elif code in (JEQ, JGE, JSET):
            hit = acc == k if code == JEQ else acc >= k if code == JGE else bool(acc & k)
            pc += jt if hit else jf
        else:
            raise ValueError(f"opcode {code:#x} at {pc - 1} not emitted by compile_rules")
