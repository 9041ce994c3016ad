"""The built-in VMM's actions as typed in-process calls (the role of Firecracker's API server).

    vmm = Vmm()
    vmm.configure_machine(vcpus=2, mem_mib=512)
    vmm.set_boot_source(kernel, initrd, "console=ttyS0 ...")
    vmm.add_device(VsockDevice(3, uds))
    vmm.add_serial_output(callback)
    vmm.start()
    exit = vmm.wait(timeout=None)   # VmExit(reason=POWEROFF|RESET|TRIPLE_FAULT|...)
    vmm.stop()                      # always safe, idempotent

All methods are synchronous and thread-safe; the vCPUs and the device loop
run in threads of their own.  Configuration is only accepted before start().
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from katapy import log
from katapy.vmm import builder
from katapy.vmm.boot.loader import BootProtocol
from katapy.vmm.config import FlatBoot, IrqChip, KernelBoot, MachineConfig, VmResources
from katapy.vmm.state import ExitReason, QueueCounts, VmExit, VmState
from katapy.vmm.vcpu import EXIT_REASONS, VcpuThread
from katapy.vmm.virtio.device import VirtioDevice

_log = log.get("vmm.api")


class VmmError(RuntimeError):
    pass


class DeviceInDoubtError(VmmError):
    """hotplug_device got no answer from the guest: the device stays plugged at ``base``
    (``unplug_device(base)`` removes it; stop() releases it)."""

    def __init__(self, message: str, base: int) -> None:
        super().__init__(message)
        self.base = base


class Vmm:
    #: how long the first hotplug waits for the guest's upcall server to listen (it starts with the agent)
    upcall_connect_timeout_s = 30.0
    #: how long one upcall request waits for the guest's answer: onlining or offlining up to max_memory's
    #: blocks takes seconds in a slow (nested) guest
    upcall_request_timeout_s = 120.0

    def __init__(self) -> None:
        self.resources = VmResources()
        self._outputs: list[Callable[[bytes], None]] = []
        self._lock = threading.Lock()  # serialises start/pause/resume/stop
        self._exit_lock = threading.Lock()  # the first reason to end wins
        self._state = VmState.NOT_STARTED
        self._exit: VmExit | None = None
        self._ended = threading.Event()
        self._built: builder.BuiltVm | None = None
        self._vcpus: list[VcpuThread] = []
        # every vCPU thread's exit counters, running or ended, appended (never removed) under self._lock:
        # a parked vCPU's exits stay counted, so exit_counts() only ever grows
        self._exit_tallies: list[list[int]] = []
        self._halted: set[int] = set()
        self._upcall_uds: Path | None = None
        self._upcall: Any = None  # katapy.vmm.upcall.DeviceManagerClient, opened on the first hotplug
        self._memory_hotplug: Any = None  # katapy.vmm.memory_hotplug.MemoryHotplug
        self._vcpu_hotplug: Any = None  # katapy.vmm.vcpu_hotplug.VcpuHotplug, made on the first resize_vcpus
        self._device_hotplug: Any = None  # katapy.vmm.device_hotplug.DeviceHotplug

    # -- configuration (before start) -----------------------------------------
    def _configurable(self) -> None:
        if self._state is not VmState.NOT_STARTED:
            raise VmmError(f"cannot configure a VM that is {self._state.value}")

    def configure_machine(self, vcpus: int, mem_mib: int, irqchip: IrqChip = IrqChip.KERNEL,
                          max_mem_mib: int | None = None, max_vcpus: int | None = None) -> None:
        """``max_mem_mib``: the RAM the VM may grow to by :meth:`resize_memory` (None: it keeps ``mem_mib``);
        ``max_vcpus``: the vCPUs it may grow to by :meth:`resize_vcpus` (None: it keeps ``vcpus``)."""
        self._configurable()
        m = MachineConfig(vcpus, mem_mib, irqchip, max_mem_mib, max_vcpus)
        m.validate()
        self.resources.machine = m

    def set_boot_source(
        self, kernel: str | Path, initrd: str | Path | None, cmdline: str, protocol: BootProtocol = BootProtocol.LINUX64
    ) -> None:
        self._configurable()
        boot = KernelBoot(Path(kernel), Path(initrd) if initrd else None, cmdline, protocol)
        boot.validate()
        self.resources.boot = boot

    def set_flat_boot(self, code: bytes, load_addr: int = 0x1000) -> None:
        """Boot a flat real-mode binary instead of a kernel (see config.FlatBoot)."""
        self._configurable()
        boot = FlatBoot(code, load_addr)
        boot.validate()
        self.resources.boot = boot

    def add_device(self, device: VirtioDevice) -> None:
        self._configurable()
        self.resources.devices.append(device)

    def set_hotplug_slots(self, count: int) -> None:
        """Reserve ``count`` empty virtio-mmio windows after the devices, for hotplug_device."""
        from katapy.vmm.config import VIRTIO_MMIO_PINS, ConfigError

        self._configurable()
        if not 0 <= count <= VIRTIO_MMIO_PINS:
            raise ConfigError(f"hotplug_slots={count}: must be 0..{VIRTIO_MMIO_PINS}")
        self.resources.hotplug_slots = count

    def set_upcall_socket(self, uds: str | Path) -> None:
        """The hybrid-vsock socket through which the VMM reaches the guest's upcall server (port 0xDB)."""
        self._configurable()
        self._upcall_uds = Path(uds)

    def add_serial_output(self, output: Callable[[bytes], None]) -> None:
        """Every byte the guest writes to COM1 goes to ``output`` (called on a vCPU thread)."""
        self._configurable()
        self._outputs.append(output)

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            self._configurable()
            self.resources.validate()  # a configuration error leaves the VMM configurable
            outputs = list(self._outputs)

            def serial_output(data: bytes) -> None:
                for o in outputs:
                    o(data)

            self.resources.serial_output = serial_output
            try:
                self._built = builder.build(self.resources, self._guest_reset)
            except BaseException:
                self._state = VmState.STOPPED
                self._exit = VmExit(ExitReason.ERROR, "build failed")
                self._ended.set()
                raise
            b = self._built
            b.loop.start()
            # self._vcpus: the running vCPU threads; replaced whole (never changed in place) under self._lock,
            # so readers without the lock (the halt and exit callbacks) see one consistent list
            self._vcpus = [VcpuThread(v, b.pio_bus, b.mmio_bus, self._vm_exit, self._vcpu_halted) for v in b.vcpus]
            self._exit_tallies = [*self._exit_tallies, *(t.exits for t in self._vcpus)]
            self._state = VmState.RUNNING
            for t in self._vcpus:
                t.start()
        _log.info("VM started", vcpus=len(self._vcpus))

    def pause(self) -> None:
        with self._lock:
            if self._state is not VmState.RUNNING:
                raise VmmError(f"cannot pause a VM that is {self._state.value}")
            ok = all([t.pause() for t in self._vcpus])
            if not ok:
                raise VmmError("a vCPU did not pause in time")
            self._state = VmState.PAUSED

    def resume(self) -> None:
        with self._lock:
            if self._state is not VmState.PAUSED:
                raise VmmError(f"cannot resume a VM that is {self._state.value}")
            for t in self._vcpus:
                t.resume()
            self._state = VmState.RUNNING

    def stop(self) -> None:
        """Stop the vCPUs, release KVM, memory and devices.  Idempotent."""
        self._finish(VmExit(ExitReason.STOPPED, "stop requested"))
        with self._lock:
            for t in self._vcpus:
                t.stop()
            for t in self._vcpus:
                if not t.join(timeout=10):
                    _log.error("vCPU thread did not stop", vcpu=t.index)
            if self._upcall is not None:
                self._upcall.close()
                self._upcall = None
            if self._built is not None and all(not t.alive for t in self._vcpus):
                self._built.close()
                self._built = None
            self._state = VmState.STOPPED

    def state(self) -> VmState:
        return self._state

    # -- hotplug ------------------------------------------------------------------
    def memory_mib(self) -> int:
        """The guest's RAM now: boot RAM plus what resize_memory added."""
        m = self.resources.machine
        extra = self._memory_hotplug.plugged if self._memory_hotplug is not None else 0
        return m.mem_mib + (extra >> 20)

    def resize_memory(self, mib: int) -> int:
        """Grow or shrink the guest's RAM to ``mib`` (boot RAM .. max_mem_mib, in 128 MiB steps above
        the boot RAM) on a running VM; returns the new size.  See katapy.vmm.memory_hotplug."""
        from katapy.vmm import memory_hotplug as mh

        with self._lock:
            if self._state is not VmState.RUNNING:
                raise VmmError(f"cannot resize the memory of a VM that is {self._state.value}")
            m = self.resources.machine
            limit = m.max_mem_mib if m.max_mem_mib is not None else m.mem_mib
            if not m.mem_mib <= mib <= limit:
                raise VmmError(f"memory {mib} MiB is outside {m.mem_mib}..{limit} MiB (boot RAM .. max_mem_mib)")
            extra = (mib - m.mem_mib) << 20
            if extra % mh.BLOCK_SIZE:
                raise VmmError(f"memory {mib} MiB: the part above the boot RAM ({mib - m.mem_mib} MiB) must be "
                               f"a multiple of {mh.BLOCK_SIZE >> 20} MiB")
            hp = self._hotplug_memory()
            try:
                hp.resize(extra)
            except mh.MemoryHotplugError as exc:
                raise VmmError(str(exc)) from exc
            return self.memory_mib()

    def vcpu_count(self) -> int:
        """The vCPUs the VM has now, each with a running thread: ``vcpus`` at start, then each resize_vcpus."""
        hp = self._vcpu_hotplug
        return hp.count if hp is not None else self.resources.machine.vcpus

    def resize_vcpus(self, n: int) -> int:
        """Give a running VM vCPUs 0..n-1 (1..max_vcpus): new ones are created (or parked ones reused) and
        onlined by the guest through upcall ADD_CPU; removed ones are offlined (DEL_CPU), then their
        threads stop.  Returns the count after.  See katapy.vmm.vcpu_hotplug."""
        from katapy.vmm import vcpu_hotplug as vh

        with self._lock:
            if self._state is not VmState.RUNNING or self._ended.is_set():
                what = self._state.value if self._state is not VmState.RUNNING else "ended"
                raise VmmError(f"cannot resize the vCPUs of a VM that is {what}")
            top = self.resources.machine.max_vcpus or self.resources.machine.vcpus
            if not 1 <= n <= top:
                raise VmmError(f"{n} vCPUs is outside 1..{top} (max_vcpus)")
            if n == self.vcpu_count():
                return n
            if self._vcpu_hotplug is None:
                ops = vh.VcpuOps(self._hot_create_vcpu, self._hot_start_vcpu, self._hot_stop_vcpu)
                self._vcpu_hotplug = vh.VcpuHotplug(self.resources.machine.vcpus, top, ops,
                                                    self._device_manager("vCPU hotplug"))
            hp = self._vcpu_hotplug
        # without self._lock: the upcall may wait long for the guest, and stop() must not wait for it;
        # each vCPU step below takes the lock and checks that the VM still runs
        try:
            return hp.resize(n)
        except vh.VcpuHotplugError as exc:
            raise VmmError(str(exc)) from exc

    def _running_vm(self, what: str) -> builder.BuiltVm:
        """The built VM, if it runs (self._lock held)."""
        if self._state is not VmState.RUNNING or self._ended.is_set() or self._built is None:
            now = self._state.value if self._state is not VmState.RUNNING else "ended"
            raise VmmError(f"cannot {what}: the VM is {now}")
        return self._built

    def _hot_create_vcpu(self, index: int) -> None:
        with self._lock:
            self._running_vm(f"create vCPU {index}").create_vcpu(index)

    def _hot_start_vcpu(self, index: int) -> None:
        with self._lock:
            b = self._running_vm(f"start vCPU {index}")
            if any(t.index == index for t in self._vcpus):
                raise VmmError(f"vCPU {index} already has a thread")
            v = next((v for v in b.vcpus if v.index == index), None)
            if v is None or b.vcpu_setup is None:
                raise VmmError(f"vCPU {index} was never created")
            b.vcpu_setup.rearm(v)
            t = VcpuThread(v, b.pio_bus, b.mmio_bus, self._vm_exit, self._vcpu_halted)
            self._halted.discard(index)
            self._vcpus = [*self._vcpus, t]
            self._exit_tallies = [*self._exit_tallies, t.exits]
            try:
                t.start()
            except BaseException:
                self._vcpus = [x for x in self._vcpus if x is not t]
                raise
            if self._ended.is_set():
                t.stop()  # the VM ended meanwhile and _vm_exit may have missed it; stop() joins it
        _log.info("vCPU thread started", vcpu=index, running=len(self._vcpus))

    def _hot_stop_vcpu(self, index: int) -> None:
        with self._lock:
            t = next((t for t in self._vcpus if t.index == index), None)
            if t is None:
                return  # stop() got there first
            t.stop()
            if not t.join(timeout=10):
                raise VmmError(f"vCPU {index}'s thread did not stop")  # it stays listed: stop() joins it
            self._vcpus = [x for x in self._vcpus if x is not t]
            self._halted.discard(index)
        _log.info("vCPU thread stopped (parked)", vcpu=index, running=len(self._vcpus))

    def _device_manager(self, what: str) -> Any:
        """The guest's upcall device-manager service (``katapy.vmm.upcall.DeviceManagerClient``), one channel
        shared by every kind of hotplug; opened on first use.  ``what`` names the caller for the error."""
        if self._upcall is None:
            from katapy.vmm.upcall import DeviceManagerClient, UpcallChannel

            if self._upcall_uds is None:
                raise VmmError(f"{what} needs the upcall channel: no vsock socket set (set_upcall_socket)")
            self._upcall = DeviceManagerClient(UpcallChannel(
                self._upcall_uds, connect_timeout=self.upcall_connect_timeout_s,
                request_timeout=self.upcall_request_timeout_s))
        return self._upcall

    def _hotplug_memory(self) -> Any:
        if self._memory_hotplug is None:
            from katapy.vmm import memory_hotplug as mh
            from katapy.vmm.boot import layout

            upcall = self._device_manager("memory hotplug")
            b = self._built
            assert b is not None
            m = self.resources.machine
            boot_end = max(base + size for base, size in layout.ram_regions(m.mem_mib << 20))
            limit = (m.max_mem_mib if m.max_mem_mib is not None else m.mem_mib) - m.mem_mib
            self._memory_hotplug = mh.MemoryHotplug(b.vm, b.mem, boot_end, (limit << 20) // mh.BLOCK_SIZE * mh.BLOCK_SIZE,
                                                    upcall)
        return self._memory_hotplug

    def hotplug_device(self, device: VirtioDevice) -> tuple[int, int]:
        """Plug a virtio-blk or virtio-net ``device`` into a free hotplug slot of the running VM and have the
        guest bind it (upcall ADD_MMIO); returns the window's (base, irq).  The VMM owns ``device`` from this
        call on: on an error it has been closed, except DeviceInDoubtError (it stays plugged).
        See katapy.vmm.device_hotplug."""
        from katapy.vmm import device_hotplug as dh

        with self._lock:
            try:
                if self._state is not VmState.RUNNING:
                    raise VmmError(f"cannot hot-plug a device into a VM that is {self._state.value}")
                hp = self._hotplug_devices()
            except BaseException:
                dh.close_device(device)
                raise
            try:
                return hp.plug(device)
            except dh.DeviceInDoubt as exc:
                raise DeviceInDoubtError(str(exc), exc.base) from exc
            except dh.DeviceHotplugError as exc:
                raise VmmError(str(exc)) from exc

    def unplug_device(self, base: int) -> None:
        """Have the guest unbind the hot-plugged device at ``base`` (upcall DEL_MMIO), then close it and
        empty its slot.  A refusal or no answer keeps it plugged (VmmError says so)."""
        from katapy.vmm import device_hotplug as dh

        with self._lock:
            if self._state is not VmState.RUNNING:
                raise VmmError(f"cannot unplug a device from a VM that is {self._state.value}")
            if self._device_hotplug is None:
                raise VmmError(f"no hot-plugged device at {base:#x}")
            try:
                self._device_hotplug.unplug(base)
            except dh.DeviceHotplugError as exc:
                raise VmmError(str(exc)) from exc

    # -- counters (any thread, no lock: plain reads of ints the vCPU and device threads keep) -----------
    def exit_counts(self) -> dict[str, int]:
        """KVM_RUN returns by reason (katapy.vmm.vcpu.EXIT_REASONS) over all vCPU threads this VM ran."""
        totals = [0] * len(EXIT_REASONS)
        for tally in self._exit_tallies:
            for i, n in enumerate(tally):
                totals[i] += n
        return dict(zip(EXIT_REASONS, totals))

    def virtio_counts(self) -> list[QueueCounts]:
        """Each virtio queue's completed requests and bytes, per device now plugged (none before start or
        after stop)."""
        b = self._built
        return b.devices.queue_counts() if b is not None else []

    def device_address(self, device: VirtioDevice) -> int | None:
        """The guest-physical base of ``device``'s virtio-mmio window (cold- or hot-plugged), None if absent."""
        b = self._built
        slot = b.devices.find(device) if b is not None else None
        return slot.base if slot is not None else None

    def _hotplug_devices(self) -> Any:
        if self._device_hotplug is None:
            from katapy.vmm.device_hotplug import DeviceHotplug

            upcall = self._device_manager("device hotplug")
            assert self._built is not None
            self._device_hotplug = DeviceHotplug(self._built.devices, upcall)
        return self._device_hotplug

    def wait(self, timeout: float | None = None) -> VmExit | None:
        """Block until the VM ends (None on timeout); the VMM keeps its resources until stop()."""
        if not self._ended.wait(timeout):
            return None
        return self._exit

    # -- host-side access ---------------------------------------------------------
    def serial_input(self, data: bytes) -> int:
        b = self._built
        return b.serial.enqueue_input(data) if b is not None else 0

    @property
    def cmdline(self) -> str:
        return self._built.cmdline if self._built is not None else ""

    @property
    def built(self) -> builder.BuiltVm | None:
        """The running VM's parts (memory, buses, devices) for diagnostics and tests."""
        return self._built

    # -- events from vCPU threads and devices ----------------------------------------
    def _finish(self, exit_: VmExit) -> bool:
        with self._exit_lock:
            if self._ended.is_set():
                return False
            self._exit = exit_
            self._ended.set()
            return True

    def _vm_exit(self, exit_: VmExit) -> None:
        if self._finish(exit_):
            _log.info("VM ended", reason=exit_.reason.value, detail=exit_.detail, vcpu=exit_.vcpu)
            # Park the other vCPUs; stop() (from the owner) releases everything.
            for t in self._vcpus:
                if t.index != exit_.vcpu:
                    t.stop()

    def _guest_reset(self) -> None:
        self._vm_exit(VmExit(ExitReason.RESET, "i8042 reset line"))

    def _vcpu_halted(self, index: int) -> None:
        self._halted.add(index)
        running = {t.index for t in self._vcpus}  # parked (hot-removed) vCPUs do not count
        if running <= self._halted:
            self._vm_exit(VmExit(ExitReason.HALTED, "all vCPUs executed HLT", index))
