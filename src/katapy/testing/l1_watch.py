"""Catch the harness's L1 emulator handing its own host state to an L2 vCPU.

In the nested KVM harness, KVM in the L1 runs L2 guests with SVM, and SVM is
emulated by QEMU's TCG.  Now and then that emulation resumes an L2 vCPU with the
*L1's* register state: the L2 vCPU's next exit (an NPF while walking page
tables from the L1's CR3) reports as its guest RIP the instruction that follows
``vmrun`` in the L1 kernel's ``__svm_vcpu_run``, the address the L1 host resumes
at after a #VMEXIT (AMD APM vol. 2, 15.6 "#VMEXIT": the host state comes back
from the host save area).  The L2 then triple-faults (KVM_EXIT_SHUTDOWN in the
VMM).  Found with the L1's kvm tracepoints (``kvm_exit`` fields per
arch/x86/kvm/trace.h).  No VMM in the L2's place can produce that state, as no
VMM ever sees the L1's own addresses; but what a VMM does can make the fault
more likely (in one L1, 2-vCPU boots crashed this way 7 times in 46 on the
built-in VMM and 0 in 20 on QEMU -enable-kvm; why is not known).

The harness therefore watches ``kvm:kvm_exit`` in the L1, filtered to exits
whose guest RIP is one of those post-``vmrun`` addresses (read from the
harness kernel's symbols) and to every L2 shutdown (SVM exit code 0x7f, AMD APM
vol. 2 appendix C), and reports them.  A filtered tracepoint records nothing
for ordinary exits.  Only an exit at a post-``vmrun`` address proves the L1's
fault; a shutdown alone is reported with its RIP and the event it was
delivering, cause not proven (a leaked L1 state whose first fault did not exit
at that address ends that way too).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

VMRUN = b"\x0f\x01\xd8"  # AMD APM vol. 3, "VMRUN"
VMRUN_FUNCTIONS = ("__svm_vcpu_run", "__svm_sev_es_vcpu_run")  # arch/x86/kvm/svm/vmenter.S
TRACEFS = "/sys/kernel/tracing"
TRACE_FILE = "l1-trace.txt"  # in the harness scratch dir
SVM_EXIT_SHUTDOWN = 0x7F

_LINE = re.compile(
    r"^\s*(?P<task>\S+)\s+\[\d+\]\s+\S+\s+(?P<ts>[\d.]+):\s+kvm_exit:\s+vcpu\s+(?P<vcpu>\d+)\s+reason\s+(?P<reason>\S+)"
    r"\s+rip\s+(?P<rip>0x[0-9a-f]+)(?:.*\sintr_info\s+(?P<intr>0x[0-9a-f]+))?"
)


@dataclass(frozen=True)
class CaughtExit:
    """One L2 exit the watch caught: at the L1's own post-vmrun address (proven), or an L2 shutdown."""

    task: str  # the L1 thread running the L2 vCPU (the VMM's vCPU thread)
    seconds: float  # L1 trace clock
    vcpu: int
    reason: str
    rip: int
    proven: bool  # the guest RIP was the L1's post-vmrun address
    intr_info: int = 0  # EXITINTINFO: the event being delivered when the exit happened

    def describe(self) -> str:
        if self.proven:
            return (f"L1 emulator fault: L2 vCPU {self.vcpu} ({self.task}) exited ({self.reason}) at guest RIP "
                    f"{self.rip:#x}, the L1 kernel's own return address after VMRUN: QEMU TCG's nested SVM resumed "
                    f"the L2 vCPU with the L1's host state (the L2 guest then triple-faults; no L2 VMM can hand it L1 "
                    f"state)")
        return (f"L2 vCPU {self.vcpu} ({self.task}) shut down (triple fault) at guest RIP {self.rip:#x} delivering "
                f"event {self.intr_info:#x}; no exit at the L1's post-VMRUN address was seen, cause not proven "
                f"(a test's deliberate triple fault reads the same)")


def vmrun_resume_addresses(vmlinux: Path) -> tuple[int, ...]:
    """Addresses right after each VMRUN instruction in the L1 kernel's SVM entry functions."""
    from elftools.elf.elffile import ELFFile

    found: list[int] = []
    with open(vmlinux, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            return ()
        for name in VMRUN_FUNCTIONS:
            syms = symtab.get_symbol_by_name(name) or []
            for sym in syms:
                addr, size = sym["st_value"], sym["st_size"] or 0x200
                code = _read(elf, addr, size)
                start = 0
                while (i := code.find(VMRUN, start)) >= 0:
                    found.append(addr + i + len(VMRUN))
                    start = i + 1
    return tuple(sorted(set(found)))


def _read(elf, addr: int, size: int) -> bytes:  # type: ignore[no-untyped-def]
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD":
            continue
        lo, hi = seg["p_vaddr"], seg["p_vaddr"] + seg["p_filesz"]
        if lo <= addr < hi:
            off = addr - lo
            return seg.data()[off: off + min(size, hi - addr)]
    return b""


def trace_filter(addresses: tuple[int, ...]) -> str:
    return " || ".join([f"exit_reason == {SVM_EXIT_SHUTDOWN:#x}", *(f"guest_rip == {a:#x}" for a in addresses)])


def init_setup(addresses: tuple[int, ...]) -> str:
    """Shell lines for the L1's init: arm the filtered kvm_exit tracepoint (before the command runs)."""
    if not addresses:
        return 'echo "harness: l1-watch off (no VMRUN found in the harness kernel symbols)"'
    ev = f"{TRACEFS}/events/kvm/kvm_exit"
    return (
        f"mount -t tracefs nodev {TRACEFS} 2>/dev/null\n"
        f"if [ -d {ev} ] && echo '{trace_filter(addresses)}' > {ev}/filter && echo 1 > {ev}/enable; then\n"
        f'  echo "harness: l1-watch on ({len(addresses)} post-VMRUN addresses)"\n'
        f"else\n"
        f'  echo "harness: l1-watch off (the harness kernel has no kvm tracepoints: rebuild it with make kernel)"\n'
        f"fi"
    )


def init_collect(scratch_mount: str) -> str:
    """Shell line for the L1's init after the command: copy what the watch caught to the scratch dir."""
    return f"[ -r {TRACEFS}/trace ] && grep kvm_exit {TRACEFS}/trace > {scratch_mount}/{TRACE_FILE} 2>/dev/null"


def parse(trace: str, addresses: tuple[int, ...]) -> list[CaughtExit]:
    """The caught exits; ``proven`` where the guest RIP is one of the L1's post-vmrun ``addresses``."""
    out = []
    for line in trace.splitlines():
        m = _LINE.match(line)
        if m:
            rip = int(m["rip"], 16)
            out.append(CaughtExit(m["task"], float(m["ts"]), int(m["vcpu"]), m["reason"], rip,
                                   rip in addresses, int(m["intr"] or "0", 16)))
    return out
