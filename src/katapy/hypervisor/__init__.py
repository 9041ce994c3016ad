"""The hypervisor interface and its backends (Kata runtime-rs ``crates/hypervisor``).

    cfg = katapy.config.load()
    hv = katapy.hypervisor.select(cfg)                       # builtin | qemu, per selection.decide
    await hv.start_vm(katapy.hypervisor.vm_config(cfg, sandbox_id, shared_dir=...))
    ... AgentClient.connect(hv.agent_socket()) ...
    await hv.stop_vm(); await hv.cleanup()
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from katapy import log
from katapy.hypervisor.base import (
    BlockDevice,
    Device,
    Hypervisor,
    HypervisorError,
    NetDevice,
    UnsupportedError,
    VmConfig,
    VmExit,
    VmState,
)
from katapy.hypervisor.selection import Decision, decide

if TYPE_CHECKING:
    from katapy.config import KatapyConfig

__all__ = [
    "BlockDevice", "Decision", "Device", "Hypervisor", "HypervisorError", "NetDevice", "UnsupportedError",
    "VmConfig", "VmExit", "VmState", "decide", "select", "vm_config",
]


def select(config: KatapyConfig | None = None, name: str | None = None) -> Hypervisor:
    """A new, not yet started Hypervisor for ``config`` (``name`` overrides ``[hypervisor] name``)."""
    if config is None:
        from katapy.config import load

        config = load()
    decision = decide(name or config.hypervisor.name)
    log.get("hypervisor").info(
        "hypervisor selected", backend=decision.name, accel=decision.accel, reason=decision.reason
    )
    # [hypervisor] seccomp: the per-thread filters of katapy's own VMM threads (the built-in VMM's vCPU and
    # device threads, the vhost-user back ends' loops beside QEMU) and QEMU's own -sandbox
    from katapy.vmm import seccomp

    seccomp.configure(config.hypervisor.seccomp)
    if decision.name == "qemu":
        from katapy.hypervisor.qemu import QemuHypervisor

        return QemuHypervisor(config.hypervisor.path, accel=decision.accel, seccomp=config.hypervisor.seccomp)
    from katapy.hypervisor.builtin import BuiltinHypervisor

    return BuiltinHypervisor()


def vm_config(
    config: KatapyConfig,
    sandbox_id: str,
    shared_dir: Path | None = None,
    state_dir: Path | None = None,
    kernel_params: str = "",
) -> VmConfig:
    """The VmConfig for one sandbox from the runtime configuration.

    ``state_dir`` defaults to ``[runtime] state_dir / sandbox_id``;
    ``kernel_params`` are added after the configured ones.
    """
    hv = config.hypervisor
    return VmConfig(
        sandbox_id=sandbox_id,
        state_dir=state_dir or config.runtime.state_dir / sandbox_id,
        kernel=hv.kernel,
        initrd=hv.initrd,
        kernel_params=" ".join(p for p in (hv.kernel_params, kernel_params) if p),
        vcpus=hv.default_vcpus,
        memory_mib=hv.default_memory,
        max_vcpus=hv.max_vcpus,
        max_memory_mib=hv.max_memory,
        shared_dir=shared_dir if hv.shared_fs == "virtio-fs" else None,
        agent_port=config.agent.port,
        debug_console=hv.debug_console,
        log_level=config.runtime.log_level,
    )
