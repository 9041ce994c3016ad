"""Hotplug latency on the built-in VMM, request to usable in the guest, with references from the same run.

    python -m benchmarks.hotplug [--runs N] [--here]

The built-in VMM needs hardware-style KVM, so on a kvm-pvm host the benchmark re-runs itself inside the
nested KVM harness (``katapy.testing.harness``), where every number is slowed by the TCG L1: read the
ratios, not the times.  One builtin sandbox VM (katapy's guest kernel and image, 1 of 2 vCPUs online,
256 MiB of 512) and, for the vCPU reference, one qemu-backend sandbox (QEMU microvm with KVM) in the
same L1.  Each step goes through the hypervisor interface the shim uses:

* vCPU 1 -> 2: ``resize_vcpus(2)`` (the VMM creates the KVM vCPU and its thread, upcall ADD_CPU has the
  guest online it) and the agent's ``SetOnlineCPUs(2)`` (what katapy.resource.cpu does next), until the
  agent reports CPUs 0 and 1 online.  Reference: the qemu backend's resize of the same shape, where the
  vCPU was created at boot and only the guest's onlining is left (QEMU microvm cannot hotplug a CPU).
* memory +256 MiB: ``resize_memory`` (two 128 MiB KVM slots, upcall ADD_MEM: the guest probes and
  onlines both blocks before it answers).
* a virtio-blk disk: ``add_device`` (placeholder virtio-mmio slot populated, upcall ADD_MMIO: the guest
  binds virtio-mmio and the disk is registered before it answers); and its ``remove_device``.

QEMU's own hotplug of memory and disks (pc-dimm, virtio-blk-pci) needs ACPI and PCI in the guest, which
katapy's guest kernel (tinyconfig + fragments, for microvm) does not have, so those have no QEMU figure
in this run; their reference is one agent round trip (``GetGuestDetails``) in the same VM: the ratio
says how many agent requests' time a hotplug costs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import Comparison, hardware_kvm_missing, header, in_harness, report

COMMAND = "python -m benchmarks.hotplug"
MAX_VCPUS = 2  # the harness L1 has 2 vCPUs
BOOT_MIB = 256
STEP_MIB = 256
DISK_BYTES = 64 << 20
DIAL_TIMEOUT_S = 240.0


def _config(backend: str) -> Any:
    from katapy import config as kconfig

    cfg = kconfig.load(check_files=False)
    return dataclasses.replace(
        cfg,
        hypervisor=dataclasses.replace(cfg.hypervisor, name=backend, default_vcpus=1, max_vcpus=MAX_VCPUS,
                                       default_memory=BOOT_MIB, max_memory=BOOT_MIB + STEP_MIB),
        agent=dataclasses.replace(cfg.agent, dial_timeout=DIAL_TIMEOUT_S),
    )


async def _vcpu_cycle(sb: Any, out: dict[str, list[float]]) -> None:
    hv, agent = sb.hypervisor, sb.agent
    t0 = time.perf_counter()
    await hv.resize_vcpus(MAX_VCPUS)
    got = await agent.set_online_cpus(MAX_VCPUS)
    out["vcpu_grow"].append(time.perf_counter() - t0)
    assert tuple(got.online_ids) == tuple(range(MAX_VCPUS)), got
    t0 = time.perf_counter()
    got = await agent.set_online_cpus(1)
    await hv.resize_vcpus(1)
    out["vcpu_shrink"].append(time.perf_counter() - t0)
    assert tuple(got.online_ids) == (0,), got


async def _rpc(sb: Any, out: dict[str, list[float]]) -> None:
    t0 = time.perf_counter()
    await sb.agent.guest_details()
    out["rpc"].append(time.perf_counter() - t0)


async def measure_builtin(runs: int, disk: Path) -> dict[str, list[float]]:
    from katapy.hypervisor.base import BlockDevice
    from katapy.testing.sandbox import sandbox_vm

    out: dict[str, list[float]] = {k: [] for k in ("vcpu_grow", "vcpu_shrink", "mem_add", "mem_remove",
                                                    "disk_add", "disk_remove", "rpc")}
    async with sandbox_vm(_config("builtin"), backend="builtin") as sb:
        hv = sb.hypervisor
        for i in range(runs):
            await _rpc(sb, out)
            await _vcpu_cycle(sb, out)
            t0 = time.perf_counter()
            assert await hv.resize_memory(BOOT_MIB + STEP_MIB) == BOOT_MIB + STEP_MIB
            out["mem_add"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert await hv.resize_memory(BOOT_MIB) == BOOT_MIB
            out["mem_remove"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await hv.add_device(BlockDevice(f"bench-disk{i}", disk))
            out["disk_add"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await hv.remove_device(f"bench-disk{i}")
            out["disk_remove"].append(time.perf_counter() - t0)
    return out


async def measure_qemu(runs: int) -> dict[str, list[float]]:
    from katapy.testing.sandbox import sandbox_vm

    out: dict[str, list[float]] = {"vcpu_grow": [], "vcpu_shrink": [], "rpc": []}
    async with sandbox_vm(_config("qemu"), backend="qemu") as sb:
        for _ in range(runs):
            await _rpc(sb, out)
            await _vcpu_cycle(sb, out)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=COMMAND)
    p.add_argument("--runs", type=int, default=3, help="hotplug cycles per kind")
    p.add_argument("--here", action="store_true", help="never delegate to the nested harness")
    a = p.parse_args(argv)
    not_hw = hardware_kvm_missing()
    if not_hw and os.environ.get("KATAPY_IN_HARNESS") != "1":
        if a.here:
            print(f"hotplug: this host's KVM is {not_hw}: Linux guests cannot run on it (drop --here)")
            return 2
        return in_harness("hotplug", [x for x in argv if x != "--here"], timeout=2400)
    from katapy.testing.sandbox import missing_requirements

    for backend in ("builtin", "qemu"):
        reason = missing_requirements(_config(backend), backend=backend)
        if reason:
            print(f"hotplug: not measured: the {backend} backend cannot start a sandbox here: {reason}")
            return 1
    where = "inside the nested harness: L1 is QEMU TCG" if os.environ.get("KATAPY_IN_HARNESS") else "hardware KVM"
    with tempfile.TemporaryDirectory(prefix="hotplug-bench-") as tmp:
        disk = Path(tmp) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(DISK_BYTES)
        ours = trio.run(measure_builtin, a.runs, disk)
    ref = trio.run(measure_qemu, a.runs)
    cmd = f"{COMMAND} --runs {a.runs}"
    header(f"hotplug latency, request to usable in the guest ({where})")
    report(Comparison(f"vCPU 1 -> {MAX_VCPUS}", "builtin: KVM vCPU created + ADD_CPU", ours["vcpu_grow"],
                      "qemu backend: vCPU present at boot, guest onlines it", ref["vcpu_grow"], command=cmd))
    report(Comparison(f"vCPU {MAX_VCPUS} -> 1", "builtin: offline + vCPU thread parked", ours["vcpu_shrink"],
                      "qemu backend: guest offlines it", ref["vcpu_shrink"], command=cmd))
    rpc = ours["rpc"]
    for key, label in (("mem_add", f"memory +{STEP_MIB} MiB (ADD_MEM, 2 blocks online)"),
                       ("mem_remove", f"memory -{STEP_MIB} MiB (DEL_MEM, slots removed)"),
                       ("disk_add", "virtio-blk hot-add (ADD_MMIO, driver bound)"),
                       ("disk_remove", "virtio-blk hot-remove (DEL_MMIO, fd closed)")):
        report(Comparison(label, "builtin", ours[key], "one agent round trip (no QEMU hotplug: no ACPI/PCI "
                          "in the guest kernel)", rpc, command=cmd))
    print(f"agent round trip: builtin {statistics.median(rpc) * 1e3:.1f} ms, "
          f"qemu {statistics.median(ref['rpc']) * 1e3:.1f} ms (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
