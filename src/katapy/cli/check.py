"""`katapy check`: can this host run katapy sandboxes, and how (like `kata-runtime check`).

Each probe is a small function returning a :class:`Finding`; the verdict
combines the KVM flavour, the configured hypervisor and the guest artifacts
into one sentence a user can act on.  Exit status: 0 when sandboxes can run
(with whichever backend), 1 when they cannot.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from katapy import paths


@dataclass
class Finding:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    hypervisor: str = ""
    accel: str = ""
    kvm_flavor: str = ""
    verdict: str = ""
    can_run: bool = False

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.findings.append(Finding(name, ok, detail))


def kvm_api_version() -> int | None:
    try:
        from katapy.vmm.kvm.system import Kvm

        with Kvm() as kvm:
            return kvm.api_version()
    except Exception:  # noqa: BLE001 - absent device, no permission, extension not built
        return None


def containerd_version() -> str | None:
    exe = shutil.which("containerd")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"\s(v?\d+\.\d+\.\d+\S*)", out)
    return m.group(1) if m else out.strip() or None


def cgroup_version() -> str:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2 (unified)"
    if Path("/sys/fs/cgroup/unified/cgroup.controllers").exists():
        return "v1 (hybrid: v1 controllers + v2 at /sys/fs/cgroup/unified)"
    if Path("/sys/fs/cgroup/memory").exists():
        return "v1 (legacy)"
    return "unknown"


def kernel_version_of(bzimage: Path) -> str | None:
    """The version string in a bzImage's setup header (boot protocol: kernel_version at 0x20e)."""
    try:
        data = bzimage.read_bytes()[:0x10000]
        off = int.from_bytes(data[0x20E:0x210], "little") + 0x200
        return data[off : data.index(b"\0", off)].decode(errors="replace").split()[0]
    except (OSError, ValueError, IndexError):
        return None


def resize_support(backend: str, max_vcpus: int) -> str:
    """What resize_vcpus/resize_memory/add_device on a running VM can do on ``backend`` (its class
    attributes; docs/hypervisor.md)."""
    if backend == "qemu":
        from katapy.hypervisor.qemu import QemuHypervisor as cls
    else:
        from katapy.hypervisor.builtin import BuiltinHypervisor as cls  # type: ignore[assignment]
    hotplug = getattr(cls, "vcpu_hotplug", "")  # the builtin VMM's: katapy.vmm.vcpu_hotplug
    vcpus = (f"vCPUs 1..{max_vcpus} ([hypervisor] max_vcpus; {hotplug})" if hotplug else
             f"vCPUs 1..{max_vcpus} ([hypervisor] max_vcpus; all created at start, the guest onlines them)"
             if cls.vcpus_present_at_boot else "vCPUs: no")
    memory = (f"memory: no ({cls.memory_hotplug_missing})" if cls.memory_hotplug_missing else
              "memory: default_memory..max_memory in 128 MiB blocks (KVM slots + upcall ADD_MEM/DEL_MEM)")
    devices = (f"device hotplug: no ({cls.device_hotplug_missing})" if cls.device_hotplug_missing else
               "device hotplug: virtio-blk and virtio-net into reserved virtio-mmio slots (upcall ADD_MMIO/DEL_MMIO)")
    return f"{vcpus}; {memory}; {devices}"


def seccomp_support(backend: str, wanted: bool) -> tuple[bool, str]:
    """Whether the built-in VMM's per-thread seccomp filters (katapy.vmm.seccomp) can be loaded here."""
    if backend == "qemu":
        return True, "QEMU's own filter: katapy always passes -sandbox on (katapy.hypervisor.qemu.command)"
    if not wanted:
        return False, "off ([hypervisor] seccomp = false): the VMM's vCPU and device threads are not filtered"
    try:
        from katapy.vmm import seccomp

        problem = seccomp.kernel_support()
        sizes = ", ".join(f"{c.value} {len(seccomp.program(c))}" for c in seccomp.ThreadClass)
    except Exception as exc:  # noqa: BLE001 - an unbuilt extension is a finding
        return False, f"unavailable: {exc}"
    if problem:
        return False, f"unavailable: {problem}"
    return True, (f"available: kernel seccomp filters with the trap action; katapy's own BPF ({sizes} "
                  "instructions) per vCPU and device thread, loaded by katapy.vmm._seccomp_trap; "
                  "the shim's own threads are not filtered")


def probe() -> Report:
    from katapy.hypervisor.selection import decide, kvm_flavor

    rep = Report()
    flavor = kvm_flavor()
    rep.kvm_flavor = flavor
    api = kvm_api_version()
    dev = Path("/dev/kvm")
    rep.add("/dev/kvm", dev.exists(), f"present, KVM API {api}" if dev.exists() else "absent")
    if flavor.startswith("hardware"):
        rep.add("kvm flavour", True, f"{flavor}: hardware virtualisation ({flavor[-3:]}), runs stock Linux guests")
    elif flavor == "kvm-pvm":
        rep.add("kvm flavour", False, "kvm-pvm: paravirtual KVM; stock Linux guests cannot run on it")
    else:
        rep.add("kvm flavour", False, "no usable /dev/kvm")
    rep.add("/dev/net/tun", Path("/dev/net/tun").exists(), "present" if Path("/dev/net/tun").exists() else "absent")
    cv = containerd_version()
    rep.add("containerd", cv is not None, cv or "not installed")
    rep.add("cgroups", True, cgroup_version())
    qemu = shutil.which("qemu-system-x86_64")
    rep.add("qemu", qemu is not None, qemu or "qemu-system-x86_64 not installed")
    from katapy.resource.network.portforward import host_support

    pf_problem = host_support()
    rep.add("port forwarding", pf_problem is None,
            "available (an iptables nat DNAT rule works in a scratch netns)" if pf_problem is None else pf_problem)

    cfg = None
    try:
        from katapy import config

        cfg = config.load(check_files=False)
        rep.add("configuration", True, str(cfg.source or "built-in defaults"))
        problems = config.file_problems(cfg)
    except Exception as exc:  # noqa: BLE001 - a bad config is a finding, not a crash
        rep.add("configuration", False, str(exc))
        problems = [str(exc)]
    kernel = cfg.hypervisor.kernel if cfg else paths.guest_bzimage()
    initrd = cfg.hypervisor.initrd if cfg else paths.guest_initramfs()
    kv = kernel_version_of(kernel) if kernel.suffix != "" or kernel.name.startswith("bz") else None
    rep.add("guest kernel", kernel.exists(), f"{kernel}" + (f" (Linux {kv})" if kv else "") if kernel.exists()
            else f"{kernel} missing (make kernel)")
    rep.add("guest image", initrd.exists(), f"{initrd} ({initrd.stat().st_size / 1e6:.1f} MB)" if initrd.exists()
            else f"{initrd} missing (make image)")

    name = cfg.hypervisor.name if cfg else "auto"
    d = decide(name, flavor)
    rep.hypervisor, rep.accel = d.name, d.accel
    rep.add("hypervisor", True, f"{d.name} (accel {d.accel}): {d.reason}")
    rep.add("live resize", True, resize_support(d.name, cfg.hypervisor.max_vcpus if cfg else 1))
    rep.add("seccomp", *seccomp_support(d.name, cfg.hypervisor.seccomp if cfg else True))

    artifacts_ok = kernel.exists() and initrd.exists() and not problems
    backend_ok = (d.name == "builtin" and flavor.startswith("hardware")) or (d.name == "qemu" and qemu is not None)
    rep.can_run = artifacts_ok and backend_ok
    if flavor == "kvm-pvm":
        consequence = "stock Linux guests cannot run on this KVM (kvm-pvm): hypervisor qemu with TCG will be used"
        if d.name == "builtin":
            consequence = "stock Linux guests cannot run on this KVM (kvm-pvm), but the configuration forces builtin"
    elif flavor == "absent":
        consequence = "no /dev/kvm: hypervisor qemu with TCG (software emulation) will be used"
    else:
        consequence = f"hardware KVM ({flavor}): the {d.name} hypervisor will be used with KVM"
    if not artifacts_ok:
        consequence += "; but " + "; ".join(problems or ["the guest kernel or image is missing (make setup)"])
    rep.verdict = ("OK: " if rep.can_run else "NOT READY: ") + consequence
    return rep


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="katapy check", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", "-v", action="store_true")
    p.parse_args(argv)
    rep = probe()
    width = max(len(f.name) for f in rep.findings)
    for f in rep.findings:
        mark = "ok  " if f.ok else "WARN"
        print(f"[{mark}] {f.name.ljust(width)}  {f.detail}")
    print(f"\n{rep.verdict}")
    return 0 if rep.can_run else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
