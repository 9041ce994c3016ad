"""The qemu backend: QEMU as an external VMM, katapy's device back ends over vhost-user.

Start sequence (``start_vm``):

1. create ``<state_dir>`` (mode 0700);
2. construct the vsock and virtio-fs back ends (``hypervisor.devices``) and
   serve each on ``<state_dir>/vhost-<id>.sock`` with a
   ``katapy.vmm.virtio.vhost_user.VhostUserServer`` (threads in this process);
3. spawn QEMU with ``-S`` (``qemu.command``): it connects to every vhost-user
   socket while realizing its devices, then opens QMP;
4. QMP ``cont``: the guest runs.

The agent is reached through the vsock back end's hybrid-vsock socket,
``<state_dir>/vsock.sock``, the same path the builtin backend uses.  microvm
has neither CPU nor memory hotplug nor a hotplug-capable bus, so devices are
cold-plugged (``add_device`` before ``start_vm``: QEMU's own virtio-blk /
virtio-net devices) and ``resize_memory`` answers :class:`UnsupportedError`.
vCPUs: all ``max_vcpus`` are created at start (``-smp <max_vcpus>``) and the
guest boots with ``maxcpus=<vcpus>``, so ``resize_vcpus`` within
1..max_vcpus is the guest's onlining/offlining (``katapy.resource.cpu``).
"""
from __future__ import annotations

import importlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import trio

from katapy import log
from katapy.hypervisor.base import BlockDevice, HypervisorError, NetDevice, UnsupportedError, VmConfig, VmExit, VmState
from katapy.hypervisor.common import SandboxVm
from katapy.hypervisor.devices import sandbox_devices
from katapy.hypervisor.qemu.command import QemuLaunch, VhostUserPort, build_command
from katapy.hypervisor.qemu.process import QMP_SOCKET, QemuProcess, kill_stale

_log = log.get("hypervisor.qemu")

# sun_path is 108 bytes with the terminating NUL (unix(7)); the hybrid-vsock socket also needs
# room for the "_<port>" of guest-initiated connections (a 32-bit port: up to 10 digits)
MAX_SOCKET_PATH = 107
VSOCK_PORT_SUFFIX = len("_4294967295")


class QemuHypervisor(SandboxVm):
    name = "qemu"
    vmm_label = "QEMU microvm"
    vcpus_present_at_boot = True  # -smp <max_vcpus>, guest maxcpus=<vcpus>
    memory_hotplug_missing = ("pc-dimm needs ACPI and virtio-mem a PCI bus; microvm runs with acpi=off and "
                              "has virtio-mmio only")
    # microvm's virtio-mmio transports are created from the command line; QEMU has no device_add for them
    device_hotplug_missing = "it has no hotplug bus: its virtio-mmio devices are fixed when QEMU starts"

    def __init__(self, binary: Path, accel: str = "tcg", seccomp: bool = True):
        super().__init__()
        self.binary = binary
        self.accel = accel
        self.seccomp = seccomp
        self.qemu: QemuProcess | None = None
        self._servers: list[Any] = []
        self._backends_lock = threading.Lock()
        self._cleaned = False

    # -- life cycle -------------------------------------------------------------
    async def start_vm(self, cfg: VmConfig) -> None:
        self._check_start(cfg)
        self._check(cfg)
        t0 = time.monotonic()
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=False)
        self.cfg = cfg  # from here on, cleanup() owns the state directory
        try:
            ports = await trio.to_thread.run_sync(self._start_backends, cfg)
            self._times["backends_s"] = time.monotonic() - t0
            launch = QemuLaunch(
                binary=self.binary,
                accel=self.accel,
                qmp_socket=cfg.state_dir / QMP_SOCKET,
                vhost_user=tuple(ports),
                block=tuple(d for d in self._cold if isinstance(d, BlockDevice)),
                net=tuple(d for d in self._cold if isinstance(d, NetDevice)),
                seccomp=self.seccomp,
            )
            tap_fds = tuple(d.tap_fd for d in launch.net if d.tap_fd is not None)
            self.qemu = QemuProcess(build_command(cfg, launch), cfg.state_dir, cfg.console_path, pass_fds=tap_fds)
            await self.qemu.spawn(launch.qmp_socket)
            self._times["spawn_s"] = time.monotonic() - t0
            await self.qemu.execute("cont")
            self._times["running_s"] = time.monotonic() - t0
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.cleanup()
            raise
        self._state = VmState.RUNNING
        _log.info("vm running", sandbox=cfg.sandbox_id, pid=self.qemu.pid, accel=self.accel, **self._times)

    def _check(self, cfg: VmConfig) -> None:
        if not os.access(self.binary, os.X_OK):
            raise HypervisorError(f"start_vm: QEMU binary {self.binary} is not executable")
        longest = max(len(str(cfg.state_dir / "vhost-shared-fs.sock")), len(str(cfg.vsock_path)) + VSOCK_PORT_SUFFIX)
        if longest > MAX_SOCKET_PATH:
            raise HypervisorError(
                f"start_vm: state_dir {cfg.state_dir} is too long: its unix socket paths would need "
                f"{longest} of the {MAX_SOCKET_PATH} bytes sun_path holds"
            )

    def _start_backends(self, cfg: VmConfig) -> list[VhostUserPort]:
        """Construct the device back ends and their vhost-user servers (runs in a worker thread)."""
        try:
            server_cls = importlib.import_module("katapy.vmm.virtio.vhost_user").VhostUserServer
        except (ImportError, AttributeError) as exc:
            raise HypervisorError(f"the qemu backend needs katapy.vmm.virtio.vhost_user: {exc}") from None
        self._devices = sandbox_devices(cfg)
        ports = []
        for dev in self._devices:
            sock = cfg.state_dir / f"vhost-{dev.dev_id}.sock"
            server = server_cls(dev.device, str(sock))
            server.start()
            self._servers.append(server)
            ports.append(VhostUserPort(dev.dev_id, sock, dev.qemu_model, dev.qemu_props))
        return ports

    async def stop_vm(self) -> None:
        if self.qemu is None:
            return
        result = await self.qemu.stop()
        self._state = VmState.STOPPED
        await trio.to_thread.run_sync(self._stop_backends)
        _log.info("vm stopped", sandbox=self.cfg.sandbox_id if self.cfg else "", reason=result.reason)

    async def pause_vm(self) -> None:
        self._need("pause_vm", VmState.RUNNING)
        assert self.qemu is not None
        await self.qemu.execute("stop")
        self._state = VmState.PAUSED

    async def resume_vm(self) -> None:
        self._need("resume_vm", VmState.PAUSED)
        assert self.qemu is not None
        await self.qemu.execute("cont")
        self._state = VmState.RUNNING

    # -- observation ---------------------------------------------------------------------
    def guest_device_address(self, dev_id: str) -> int:
        """Unsupported: QEMU places its virtio-mmio devices itself (microvm's own allocation)."""
        raise UnsupportedError(f"guest_device_address {dev_id}: QEMU microvm places its devices itself; "
                               f"their virtio-mmio addresses are not known to katapy")

    def state(self) -> VmState:
        if self._state in (VmState.RUNNING, VmState.PAUSED) and self.qemu is not None and not self.qemu.alive():
            self._state = VmState.STOPPED
        return self._state

    async def wait_exit(self) -> VmExit:
        if self.qemu is None:
            raise HypervisorError("wait_exit: the VM was never started")
        result = await self.qemu.wait()
        self._state = VmState.STOPPED
        await trio.to_thread.run_sync(self._stop_backends)
        return result

    def metrics(self) -> dict[str, float | int | str]:
        out = super().metrics()
        out["accel"] = self.accel
        if self.qemu is not None and self.qemu.pid is not None:
            out["pid"] = self.qemu.pid
            try:
                for line in Path(f"/proc/{self.qemu.pid}/status").read_text().splitlines():
                    if line.startswith(("VmRSS:", "Threads:")):
                        key, value = line.split(":", 1)
                        out["rss_kib" if key == "VmRSS" else "threads"] = int(value.split()[0])
            except (OSError, ValueError):
                pass
        return out

    # -- teardown -------------------------------------------------------------------------
    def _stop_backends(self) -> None:
        """Stop the vhost-user servers and close the devices (worker thread; wait_exit and stop_vm may race)."""
        with self._backends_lock:
            self._stop_backends_locked()

    def _stop_backends_locked(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            try:
                server.stop()  # also closes its device
            except Exception as exc:  # one failing back end must not keep the others running
                _log.error("vhost-user server stop failed", error=repr(exc))
        served = {id(server.device) for server in servers}
        self._devices = [d for d in self._devices if id(d.device) not in served]
        self._close_devices()  # devices whose server never started

    async def cleanup(self) -> None:
        with trio.CancelScope(shield=True):
            if self.qemu is not None:
                await self.qemu.kill()
            if self._state is not VmState.NOT_STARTED or self.qemu is not None:
                self._state = VmState.STOPPED
            await trio.to_thread.run_sync(self._stop_backends)
            if self.cfg is not None and not self._cleaned:
                cleanup_state_dir(self.cfg.state_dir)
                self._cleaned = True


def cleanup_state_dir(state_dir: Path) -> None:
    """Kill a QEMU left behind in ``state_dir`` (shim died) and remove the directory."""
    kill_stale(state_dir)
    shutil.rmtree(state_dir, ignore_errors=True)
