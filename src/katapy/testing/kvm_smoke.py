"""A raw-KVM smoke program: create a VM with one vCPU, run a real-mode guest to HLT.

The guest writes one byte to I/O port 0x10 and halts.  It runs on any KVM,
kvm-pvm included, so it proves the ioctl path (katapy.vmm.kvm over the cffi
extension) works; what KVM it ran on is reported next to the result.

    python -m katapy.testing.kvm_smoke   ->  kvm-smoke: ok flavor=... exits=IoOut(port=0x10,data=0x4b),Hlt
"""
from __future__ import annotations

import sys

GUEST_CODE = bytes([0xB0, 0x4B, 0xE6, 0x10, 0xF4])  # mov al,'K'; out 0x10,al; hlt
CODE_ADDR = 0x1000


def run() -> list[object]:
    from katapy.vmm.kvm import exits
    from katapy.vmm.kvm.system import Kvm
    from katapy.vmm.memory import GuestMemory

    seen: list[object] = []
    with Kvm() as kvm, GuestMemory.create([(0, 0x10000)]) as mem:
        vm = kvm.create_vm()
        try:
            vm.register_memory(mem)
            mem.write(CODE_ADDR, GUEST_CODE)
            vcpu = vm.create_vcpu(0)
            try:
                s = vcpu.get_sregs()
                s.cs.base, s.cs.selector = 0, 0
                vcpu.set_sregs(s)
                r = vcpu.get_regs()
                r.rip, r.rflags = CODE_ADDR, 0x2
                vcpu.set_regs(r)
                for _ in range(16):
                    e = vcpu.run()
                    seen.append(e)
                    if isinstance(e, exits.IoOut):
                        continue
                    break
            finally:
                vcpu.close()
        finally:
            vm.close()
    return seen


def describe(seen: list[object]) -> str:
    parts = []
    for e in seen:
        if type(e).__name__ == "IoOut":
            parts.append(f"IoOut(port={e.port:#x},data={e.data.hex()})")  # type: ignore[attr-defined]
        else:
            parts.append(type(e).__name__)
    return ",".join(parts)


def main() -> int:
    from katapy.vmm.kvm.host import kvm_flavor

    flavor = kvm_flavor()
    try:
        seen = run()
    except Exception as exc:  # noqa: BLE001 - report, don't trace
        print(f"kvm-smoke: FAILED flavor={flavor} error={exc!r}")
        return 1
    ok = describe(seen) == "IoOut(port=0x10,data=4b),Hlt"
    print(f"kvm-smoke: {'ok' if ok else 'FAILED'} flavor={flavor} exits={describe(seen)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
