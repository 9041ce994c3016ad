"""What both backends share: state checks, the sandbox devices' teardown, fixed-size resources."""
from __future__ import annotations

from pathlib import Path

import trio

from katapy import log
from katapy.hypervisor.base import (
    BlockDevice,
    Device,
    Hypervisor,
    HypervisorError,
    NetDevice,
    UnsupportedError,
    VmConfig,
    VmState,
)
from katapy.hypervisor.devices import SandboxDevice

_log = log.get("hypervisor")


class SandboxVm(Hypervisor):
    """Base of the builtin and qemu backends (one VM per instance, started once)."""

    #: how messages name the VMM, e.g. "QEMU microvm"
    vmm_label = ""
    #: True when start_vm creates all max_vcpus vCPUs (resize_vcpus then needs only the guest)
    vcpus_present_at_boot = False
    #: why resize_memory cannot work on this backend, for its error
    memory_hotplug_missing = "no hotplug-capable memory device"

    def __init__(self) -> None:
        self.cfg: VmConfig | None = None
        self._state = VmState.NOT_STARTED
        self._devices: list[SandboxDevice] = []
        self._cold: list[Device] = []  # block/net devices added before start_vm
        self._times: dict[str, float] = {}
        self._vcpus: int | None = None  # set by resize_vcpus
        self._memory: int | None = None  # MiB, set by resize_memory
        self._device_lock = trio.Lock()  # one hotplug or unplug at a time: the id check and the plug are one step

    def _check_start(self, cfg: VmConfig) -> None:
        """Refuse a second start, missing boot files and a state directory that exists."""
        if self._state is not VmState.NOT_STARTED:
            raise HypervisorError(f"start_vm: VM is {self._state.value}; a {type(self).__name__} starts one VM once")
        for what, p in (("kernel", cfg.kernel), ("initrd", cfg.initrd)):
            if not p.is_file():
                raise HypervisorError(f"start_vm: {what} {p} does not exist")
        if cfg.shared_dir is not None and not cfg.shared_dir.is_dir():
            raise HypervisorError(f"start_vm: shared_dir {cfg.shared_dir} is not a directory")
        if cfg.state_dir.exists():
            raise HypervisorError(f"start_vm: state_dir {cfg.state_dir} already exists (another sandbox?)")

    def _need(self, op: str, want: VmState) -> None:
        state = self.state()
        if state is not want:
            raise HypervisorError(f"{op}: VM is {state.value}, not {want.value}")

    #: why devices cannot be added to or removed from a running VM on this backend ("" where they can)
    device_hotplug_missing = "it has no hotplug-capable bus"

    def _device_ids(self) -> set[str]:
        """The ids of the block/net devices the VM has (or will get at start)."""
        return {d.dev_id for d in self._cold}

    def _check_new_device(self, dev: Device) -> None:
        if not isinstance(dev, (BlockDevice, NetDevice)):
            raise HypervisorError(f"add_device: unknown device type {type(dev).__name__}")
        if dev.dev_id in self._device_ids():
            raise HypervisorError(f"add_device: a device with id {dev.dev_id!r} exists already")
        if isinstance(dev, BlockDevice) and not dev.path.exists():
            raise HypervisorError(f"add_device {dev.dev_id}: {dev.path} does not exist")

    async def add_device(self, dev: Device) -> None:
        """Before start_vm: cold-plug (recorded for start_vm).  After: :meth:`_hotplug` (the backend's)."""
        if self._state is VmState.NOT_STARTED:
            self._check_new_device(dev)
            self._cold.append(dev)
            return
        if self.device_hotplug_missing:
            raise UnsupportedError(f"add_device {dev.dev_id}: {self.vmm_label} has no hotplug "
                                   f"({self.device_hotplug_missing}); add devices before start_vm")
        async with self._device_lock:
            self._need(f"add_device {dev.dev_id}", VmState.RUNNING)
            self._check_new_device(dev)
            await self._hotplug(dev)

    async def remove_device(self, dev_id: str) -> None:
        if self._state is VmState.NOT_STARTED:
            before = len(self._cold)
            self._cold = [d for d in self._cold if d.dev_id != dev_id]
            if len(self._cold) == before:
                raise HypervisorError(f"remove_device: no device with id {dev_id!r}")
            return
        if self.device_hotplug_missing:
            raise UnsupportedError(f"remove_device {dev_id}: {self.vmm_label} has no hot-unplug "
                                   f"({self.device_hotplug_missing})")
        async with self._device_lock:
            self._need(f"remove_device {dev_id}", VmState.RUNNING)
            await self._hotunplug(dev_id)

    async def _hotplug(self, dev: Device) -> None:
        """Add ``dev`` (checked: new id, known type) to the running VM; backends with hotplug override."""
        raise UnsupportedError(f"add_device {dev.dev_id}: {self.vmm_label} has no hotplug")

    async def _hotunplug(self, dev_id: str) -> None:
        raise UnsupportedError(f"remove_device {dev_id}: {self.vmm_label} has no hot-unplug")

    def guest_device_address(self, dev_id: str) -> int:
        raise UnsupportedError(f"guest_device_address {dev_id}: {self.vmm_label} places its devices itself")

    @property
    def vcpus(self) -> int:
        """The vCPUs the guest was last given (boot: ``VmConfig.vcpus``; then each resize_vcpus)."""
        if self._vcpus is not None:
            return self._vcpus
        return self.cfg.vcpus if self.cfg else 0

    def _check_vcpus(self, n: int) -> None:
        """The checks every resize_vcpus makes first: a started VM, 1..max_vcpus, running."""
        if self.cfg is None:
            raise HypervisorError(f"resize_vcpus {n}: the VM was never started")
        limit = self.cfg.max_vcpus
        if not 1 <= n <= limit:
            raise HypervisorError(f"resize_vcpus {n}: out of range 1..{limit} (the VM was started with "
                                  f"max_vcpus = {limit}: [hypervisor] max_vcpus)")
        self._need(f"resize_vcpus {n}", VmState.RUNNING)

    async def resize_vcpus(self, n: int) -> int:
        """Within 1..max_vcpus on a running VM.  A backend with ``vcpus_present_at_boot`` created all
        max_vcpus vCPUs at start (the guest keeps the extra ones offline, ``maxcpus=``), so the VMM has
        nothing to add or remove and the count is only recorded; the agent onlines/offlines them."""
        self._check_vcpus(n)
        if n == self.vcpus:
            return n
        if not self.vcpus_present_at_boot:
            raise UnsupportedError(f"resize_vcpus {self.vcpus} -> {n}: {self.vmm_label} has no CPU hotplug")
        _log.info("vcpus resized", sandbox=self.cfg.sandbox_id, old=self.vcpus, new=n, present=self.cfg.max_vcpus)
        self._vcpus = n
        return n

    @property
    def memory_mib(self) -> int:
        """The guest's RAM in MiB (boot: ``VmConfig.memory_mib``; then each resize_memory)."""
        if self._memory is not None:
            return self._memory
        return self.cfg.memory_mib if self.cfg else 0

    async def resize_memory(self, mib: int) -> int:
        current = self.memory_mib
        if mib == current:
            return current
        raise UnsupportedError(f"resize_memory {current} -> {mib} MiB: {self.vmm_label} has no memory hotplug "
                               f"({self.memory_hotplug_missing})")

    def agent_socket(self) -> Path:
        if self.cfg is None:
            raise HypervisorError("agent_socket: the VM was never started")
        return self.cfg.vsock_path

    def metrics(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {"backend": self.name, "state": self.state().value}
        out.update(self._times)
        if self.cfg is not None:
            try:
                out["console_bytes"] = self.cfg.console_path.stat().st_size
            except OSError:
                pass
        return out

    def console_log(self) -> str:
        """What the guest printed on its serial console so far."""
        if self.cfg is None:
            return ""
        try:
            return self.cfg.console_path.read_text(errors="replace")
        except OSError:
            return ""

    def _close_devices(self) -> None:
        """Close the sandbox devices' back ends (sockets, files); each failure is logged, none stops the rest."""
        devices, self._devices = self._devices, []
        for dev in devices:
            try:
                dev.device.close()
            except Exception as exc:
                _log.error("device close failed", device=dev.dev_id, error=repr(exc))
