"""The builtin backend: drives ``katapy.vmm.api.Vmm`` (vCPU and device threads in this process).

The VMM's calls are synchronous and may block (building the VM, joining vCPU
threads), so each runs in a trio worker thread.  The sandbox devices (vsock,
virtio-fs) are added in-process on the VMM's virtio-mmio transport; the agent
is reached through the vsock device's hybrid-vsock socket
``<state_dir>/vsock.sock``, as with the qemu backend.

Whatever ends the VM — guest power-off or reset, a guest panic (``panic=-1``
makes it a reset), a triple fault, a KVM internal error, an exception inside
the VMM — comes back from ``Vmm.wait`` (``katapy.vmm.state.VmExit``) and
becomes a :class:`VmExit`; nothing is left waiting.
"""
from __future__ import annotations

import importlib
import shutil
import time
from typing import Any

import trio

from katapy import log
from katapy.hypervisor.base import (
    Device,
    HypervisorError,
    UnsupportedError,
    VmConfig,
    VmExit,
    VmState,
    panic_line,
    read_tail,
)
from katapy.hypervisor.common import SandboxVm
from katapy.hypervisor.devices import cold_device, sandbox_devices

_log = log.get("hypervisor.builtin")

#: empty virtio-mmio windows every builtin VM reserves for block/net hotplug (katapy.vmm.device_hotplug);
#: fewer when cold-plugged devices leave fewer IOAPIC pins
HOTPLUG_SLOTS = 8


# katapy.vmm.state.ExitReason values -> VmExit reasons
_REASONS = {
    "poweroff": "guest-shutdown",
    "halted": "guest-shutdown",  # every vCPU halted with nothing left to wake it
    "reset": "guest-reset",
    "triple-fault": "guest-reset",
    "crash": "guest-panic",
    "stopped": "stopped",
    "error": "vmm-error",
}


def classify_exit(vmm_exit: object, console: str) -> VmExit:
    """Turn what ``Vmm.wait`` returned (a ``katapy.vmm.state.VmExit``) or raised into a VmExit.

    The VMM keeps the first reason the VM ended for, so a guest that died
    before the host's stop() is reported as what it was, not as "stopped".
    """
    if isinstance(vmm_exit, BaseException):
        return VmExit("vmm-error", f"the VMM failed: {vmm_exit!r}", None, console)
    raw = getattr(vmm_exit, "reason", None)
    value = str(getattr(raw, "value", raw))
    detail = str(getattr(vmm_exit, "detail", "")) or value
    reason = _REASONS.get(value, "vmm-error")
    panic = panic_line(console)
    if panic and reason in ("guest-reset", "guest-panic", "guest-shutdown"):
        return VmExit("guest-panic", panic, None, console)  # panic=-1: the kernel reset after panicking
    return VmExit(reason, detail if value in detail else f"{value}: {detail}", None, console)


class BuiltinHypervisor(SandboxVm):
    name = "builtin"
    vmm_label = "the builtin VMM"
    # vcpus KVM vCPUs at start, max_vcpus in the MP table (the guest boots with maxcpus=<vcpus>);
    # resize_vcpus creates/parks the others at run time (katapy.vmm.vcpu_hotplug, upcall ADD_CPU/DEL_CPU)
    vcpus_present_at_boot = False
    vcpu_hotplug = "KVM vCPUs created (or parked ones reused) at run time, onlined by upcall ADD_CPU/DEL_CPU"
    memory_hotplug_missing = ""  # memory is hot-added through the upcall channel (katapy.vmm.memory_hotplug)
    device_hotplug_missing = ""  # block/net devices go into placeholder virtio-mmio slots (katapy.vmm.device_hotplug)

    def __init__(self, boot_protocol: str | None = None) -> None:
        """``boot_protocol``: "linux64" | "pvh" (katapy.vmm.boot.loader.BootProtocol); None = the VMM's default."""
        super().__init__()
        self.boot_protocol = boot_protocol
        self._console: Any = None  # the console.log file the serial output goes to
        self._vmm: Any = None
        self._exit: VmExit | None = None
        self._start_called = False
        self._started = False  # Vmm.start() returned: there are threads to stop and wait for
        self._exit_lock = trio.Lock()
        self._hot: dict[str, Any] = {}  # dev_id -> hypervisor.devices.SandboxDevice added after start

    async def start_vm(self, cfg: VmConfig) -> None:
        self._check_start(cfg)
        try:
            vmm_cls = importlib.import_module("katapy.vmm.api").Vmm
        except (ImportError, AttributeError) as exc:
            raise HypervisorError(f"the builtin backend needs katapy.vmm.api.Vmm: {exc}") from None
        t0 = time.monotonic()
        cfg.state_dir.mkdir(mode=0o700, parents=True)
        self.cfg = cfg
        try:
            await trio.to_thread.run_sync(self._build, vmm_cls, cfg)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self.cleanup()
            if isinstance(exc, Exception) and not isinstance(exc, HypervisorError):
                raise HypervisorError(f"start_vm: the VMM failed: {exc}") from exc
            raise
        self._times["running_s"] = time.monotonic() - t0
        self._state = VmState.RUNNING
        _log.info("vm running", sandbox=cfg.sandbox_id, **self._times)

    def _build(self, vmm_cls: Any, cfg: VmConfig) -> None:
        vmm = self._vmm = vmm_cls()
        vmm.configure_machine(cfg.vcpus, cfg.memory_mib, max_mem_mib=cfg.max_memory_mib, max_vcpus=cfg.max_vcpus)
        vmm.set_upcall_socket(cfg.vsock_path)  # the VMM's hybrid-vsock socket reaches the guest's upcall port
        from katapy.vmm.config import I8042_KERNEL_PARAMS

        cmdline = cfg.guest_cmdline(I8042_KERNEL_PARAMS)
        if self.boot_protocol is None:
            vmm.set_boot_source(cfg.kernel, cfg.initrd, cmdline)
        else:
            from katapy.vmm.boot.loader import BootProtocol

            vmm.set_boot_source(cfg.kernel, cfg.initrd, cmdline, BootProtocol(self.boot_protocol))
        console = self._console = open(cfg.console_path, "ab", buffering=0)
        vmm.add_serial_output(console.write)  # called on a vCPU thread; unbuffered, so readers see it at once
        self._devices = sandbox_devices(cfg)
        for cold in self._cold:
            self._devices.append(cold_device(cold))
        for dev in self._devices:
            vmm.add_device(dev.device)
        from katapy.vmm.config import VIRTIO_MMIO_PINS

        vmm.set_hotplug_slots(max(0, min(HOTPLUG_SLOTS, VIRTIO_MMIO_PINS - len(self._devices))))
        self._start_called = True  # from here on the VMM owns the devices (it closes them in stop())
        vmm.start()
        self._started = True

    async def resize_vcpus(self, n: int) -> int:
        """Hot-add or remove vCPUs (katapy.vmm.vcpu_hotplug: KVM vCPUs created or parked, upcall ADD_CPU/DEL_CPU
        to the guest, which onlines/offlines them); returns the count after.  Range: 1..max_vcpus, VM running."""
        self._check_vcpus(n)
        if n == self.vcpus:
            return n
        from katapy.vmm.api import VmmError

        old = self.vcpus
        try:
            got: int = await trio.to_thread.run_sync(self._vmm.resize_vcpus, n)
        except VmmError as exc:
            self._vcpus = await trio.to_thread.run_sync(self._vmm.vcpu_count)
            raise HypervisorError(f"resize_vcpus {old} -> {n}: {exc} (the VM has {self._vcpus} vCPUs)") from None
        self._vcpus = got
        _log.info("vcpus resized", sandbox=self.cfg.sandbox_id, old=old, new=got)
        return got

    async def resize_memory(self, mib: int) -> int:
        """Hot-add or remove RAM above the boot size (katapy.vmm.memory_hotplug: 128 MiB blocks, upcall
        ADD_MEM/DEL_MEM to the guest); returns the guest's RAM after.  Range: memory_mib..max_memory_mib."""
        if self.cfg is None:
            raise HypervisorError(f"resize_memory {mib} MiB: the VM was never started")
        lo, hi = self.cfg.memory_mib, self.cfg.max_memory_mib
        if not lo <= mib <= hi:
            raise HypervisorError(f"resize_memory {mib} MiB: out of range {lo}..{hi} MiB (boot memory .. "
                                  f"[hypervisor] max_memory)")
        self._need(f"resize_memory {mib} MiB", VmState.RUNNING)
        if mib == self.memory_mib:
            return mib
        from katapy.vmm.api import VmmError

        old = self.memory_mib
        try:
            got: int = await trio.to_thread.run_sync(self._vmm.resize_memory, mib)
        except VmmError as exc:
            self._memory = await trio.to_thread.run_sync(self._vmm.memory_mib)
            raise HypervisorError(f"resize_memory {old} -> {mib} MiB: {exc}") from None
        self._memory = got
        _log.info("memory resized", sandbox=self.cfg.sandbox_id, old_mib=old, new_mib=got)
        return got

    # -- device hotplug (katapy.vmm.device_hotplug) ------------------------------------
    def _device_ids(self) -> set[str]:
        return super()._device_ids() | set(self._hot) | {d.dev_id for d in self._devices}

    async def _hotplug(self, dev: Device) -> None:
        """Build the block/net back end and plug it into a free virtio-mmio slot of the running VM;
        returns once the guest has bound its driver (upcall ADD_MMIO answered)."""
        from katapy.vmm.api import VmmError

        try:
            # one worker-thread call: a cancellation cannot fall between opening the back end and handing it over
            base, irq = await trio.to_thread.run_sync(self._plug_sync, dev)
        except (OSError, ValueError, VmmError) as exc:  # the back end could not be built, or the VMM closed it
            raise HypervisorError(f"add_device {dev.dev_id}: {exc}") from None
        _log.info("device hot-plugged", sandbox=self.cfg.sandbox_id if self.cfg else "", device=dev.dev_id,
                  base=hex(base), irq=irq)

    def _plug_sync(self, dev: Device) -> tuple[int, int]:
        from katapy.vmm.api import DeviceInDoubtError

        sd = cold_device(dev)  # opens the image / dups the tap fd
        try:
            base, irq = self._vmm.hotplug_device(sd.device)  # the VMM owns the back end from here
        except DeviceInDoubtError:
            self._hot[dev.dev_id] = sd  # still plugged: remove_device can take it out, stop_vm releases it
            raise
        self._hot[dev.dev_id] = sd
        return base, irq

    async def _hotunplug(self, dev_id: str) -> None:
        """Have the guest unbind the device (upcall DEL_MMIO), then close it: its image or tap fd is released."""
        from katapy.vmm.api import VmmError

        sd = self._hot.get(dev_id)
        if sd is None:
            if dev_id in self._device_ids():
                raise UnsupportedError(f"remove_device {dev_id}: it was plugged at start_vm and has no hotplug "
                                       f"slot; only devices added to the running VM can be unplugged")
            raise HypervisorError(f"remove_device: no device with id {dev_id!r}")
        base = self._vmm.device_address(sd.device)
        if base is None:  # the VMM no longer has it (it stopped meanwhile)
            del self._hot[dev_id]
            raise HypervisorError(f"remove_device {dev_id}: the VMM no longer has this device")
        try:
            await trio.to_thread.run_sync(self._vmm.unplug_device, base)
        except VmmError as exc:
            raise HypervisorError(f"remove_device {dev_id}: {exc}") from None
        del self._hot[dev_id]
        _log.info("device unplugged", sandbox=self.cfg.sandbox_id if self.cfg else "", device=dev_id, base=hex(base))

    def guest_device_address(self, dev_id: str) -> int:
        if not self._started:
            raise HypervisorError(f"guest_device_address {dev_id}: the VM is not running")
        sd = self._hot.get(dev_id) or next((d for d in self._devices if d.dev_id == dev_id), None)
        base = self._vmm.device_address(sd.device) if sd is not None else None
        if base is None:
            raise HypervisorError(f"guest_device_address: no device with id {dev_id!r}")
        return int(base)

    async def stop_vm(self) -> None:
        if not self._started:
            return
        await trio.to_thread.run_sync(self._vmm.stop)
        await self.wait_exit()

    async def pause_vm(self) -> None:
        self._need("pause_vm", VmState.RUNNING)
        await trio.to_thread.run_sync(self._vmm.pause)
        self._state = VmState.PAUSED

    async def resume_vm(self) -> None:
        self._need("resume_vm", VmState.PAUSED)
        await trio.to_thread.run_sync(self._vmm.resume)
        self._state = VmState.RUNNING

    # -- counters from inside the VMM (katapy_hypervisor_vm_exits_total, _virtio_*: katapy.metrics.sandbox) --
    def exit_counts(self) -> dict[str, int]:
        """KVM exits by reason over the VM's life; empty before start (katapy.vmm.api.Vmm.exit_counts)."""
        return self._vmm.exit_counts() if self._started else {}

    def virtio_counts(self) -> list[Any]:
        """katapy.vmm.state.QueueCounts per queue of each device plugged now; empty when the VM is not built."""
        return self._vmm.virtio_counts() if self._started else []

    def metrics(self) -> dict[str, float | int | str]:
        out = super().metrics()
        if self._started:
            out["vm_exits"] = sum(self.exit_counts().values())
        return out

    def state(self) -> VmState:
        if self._exit is not None:
            return VmState.STOPPED
        return self._state

    async def wait_exit(self) -> VmExit:
        if not self._started or self.cfg is None:
            raise HypervisorError("wait_exit: the VM was never started")
        if self._exit is not None:
            return self._exit
        try:
            reason: object = await trio.to_thread.run_sync(self._vmm.wait, None, abandon_on_cancel=True)
        except Exception as exc:  # the VMM's own failure is an exit reason, not our crash
            reason = exc
        async with self._exit_lock:
            if self._exit is None:
                self._exit = classify_exit(reason, read_tail(self.cfg.console_path))
                self._state = VmState.STOPPED
                _log.info("vm exited", sandbox=self.cfg.sandbox_id, reason=self._exit.reason, detail=self._exit.detail)
        return self._exit

    async def cleanup(self) -> None:
        with trio.CancelScope(shield=True):
            if self._vmm is not None:
                try:
                    # stop() (idempotent) releases what the VMM holds — guest memory, KVM and device fds —
                    # also after the guest ended by itself, when wait_exit() has already recorded the exit
                    await trio.to_thread.run_sync(self._vmm.stop)
                    if self._started and self._exit is None:
                        with trio.move_on_after(10):
                            await self.wait_exit()
                except Exception as exc:
                    _log.error("VMM stop failed during cleanup", error=repr(exc))
            if not self._start_called:
                self._close_devices()
            self._devices = []
            self._hot = {}  # the VMM's stop() closed them
            if self._console is not None:
                self._console.close()
                self._console = None
            if self._state is not VmState.NOT_STARTED:
                self._state = VmState.STOPPED
            if self.cfg is not None:
                shutil.rmtree(self.cfg.state_dir, ignore_errors=True)
