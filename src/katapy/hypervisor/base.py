"""The hypervisor interface: what the shim asks of any VMM backend.

Kata's runtime-rs keeps one ``Hypervisor`` trait (``crates/hypervisor``) with
one folder per backend; katapy does the same.  Two backends implement it:

* ``builtin`` (``katapy.hypervisor.builtin``): the in-process VMM
  (``katapy.vmm.api.Vmm``), Dragonball's place in Kata 4.0;
* ``qemu`` (``katapy.hypervisor.qemu``): an external QEMU process whose vsock
  and virtio-fs devices are served by katapy over vhost-user.

Both expose the agent the same way: a hybrid-vsock unix socket at
``<state_dir>/vsock.sock`` (Firecracker ``docs/vsock.md``).  Every method is a
trio coroutine; ``cleanup()`` may be called at any time, any number of times.
"""
from __future__ import annotations

import abc
import enum
import os
from dataclasses import dataclass
from pathlib import Path

#: file names inside a sandbox's state directory, shared by both backends
VSOCK_SOCKET = "vsock.sock"
CONSOLE_LOG = "console.log"

#: first guest CID a sandbox may use (0, 1 and 2 are reserved: virtio 1.2, 5.10.4)
GUEST_CID = 3


CONSOLE_TAIL_BYTES = 4096


def read_tail(path: Path, nbytes: int = CONSOLE_TAIL_BYTES) -> str:
    """The last ``nbytes`` of a file as text ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def panic_line(console: str) -> str | None:
    """The guest kernel's "Kernel panic - not syncing: ..." line, if the console shows one."""
    for line in console.splitlines():
        if "Kernel panic" in line:
            return line.strip()
    return None


class HypervisorError(Exception):
    """A backend could not do what was asked; the message says why."""


class UnsupportedError(HypervisorError):
    """The backend (or its machine type) cannot do this operation at all."""


class VmState(enum.Enum):
    """Life cycle of one sandbox VM."""

    NOT_STARTED = "not-started"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"  # the VM ended (asked to, or on its own)


@dataclass(frozen=True)
class VmConfig:
    """Everything needed to start one sandbox VM (Kata's ``HypervisorConfig``, per sandbox)."""

    sandbox_id: str
    state_dir: Path  # created by start_vm, removed by cleanup
    kernel: Path
    initrd: Path
    kernel_params: str = ""  # appended after the backend's own parameters
    vcpus: int = 1  # online when the guest boots
    memory_mib: int = 256
    max_vcpus: int = 1  # present (created by the VMM); the guest keeps those beyond ``vcpus`` offline
    max_memory_mib: int = 256
    shared_dir: Path | None = None  # exported as virtio-fs tag "katapy-shared"
    agent_port: int = 1024
    debug_console: bool = False
    log_level: str = "info"
    guest_cid: int = GUEST_CID

    def __post_init__(self) -> None:
        if not self.sandbox_id:
            raise ValueError("VmConfig.sandbox_id is empty")
        if self.vcpus < 1 or self.vcpus > self.max_vcpus:
            raise ValueError(f"VmConfig.vcpus={self.vcpus} must be in 1..max_vcpus={self.max_vcpus}")
        if self.memory_mib < 64 or self.memory_mib > self.max_memory_mib:
            raise ValueError(
                f"VmConfig.memory_mib={self.memory_mib} must be in 64..max_memory_mib={self.max_memory_mib}"
            )
        if not 0 < self.agent_port < 1 << 32:
            raise ValueError(f"VmConfig.agent_port={self.agent_port} is not a vsock port")
        if not 2 < self.guest_cid < 0xFFFFFFFF:
            raise ValueError(f"VmConfig.guest_cid={self.guest_cid} is reserved")

    @property
    def vsock_path(self) -> Path:
        return self.state_dir / VSOCK_SOCKET

    @property
    def console_path(self) -> Path:
        return self.state_dir / CONSOLE_LOG

    def guest_cmdline(self, backend_params: str = "") -> str:
        """The kernel command line: backend's, katapy's agent conventions, then the user's.

        With more vCPUs present than booted, ``maxcpus=<vcpus>`` keeps the rest
        present but offline (Documentation/admin-guide/kernel-parameters.txt,
        "maxcpus="): ``katapy.resource.cpu`` has the agent online them later
        through ``/sys/devices/system/cpu/cpuN/online``.
        """
        parts = [
            backend_params,
            "console=ttyS0",
            f"maxcpus={self.vcpus}" if self.max_vcpus > self.vcpus else "",
            # a panic reboots at once, by triple fault (microvm has no i8042 for reboot=k), and the
            # backends turn a reboot into an exit
            "reboot=t panic=-1",
            f"katapy.agent_port={self.agent_port}",
            f"katapy.log={self.log_level}",
        ]
        if self.debug_console:
            parts.append("katapy.debug_console=1")
        if not self.debug_console and self.log_level != "debug":
            parts.append("quiet")
        parts.append(self.kernel_params)
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class VmExit:
    """Why a VM ended: returned by ``Hypervisor.wait_exit``."""

    reason: str  # "stopped" | "guest-shutdown" | "guest-reset" | "guest-panic" | "vmm-killed" | "vmm-error"
    detail: str = ""  # e.g. "qemu killed by SIGKILL", the VMM's error text
    exit_code: int | None = None  # the VMM process's status, when there is one
    console_tail: str = ""  # the last lines the guest printed

    @property
    def expected(self) -> bool:
        """True when the host asked the VM to stop."""
        return self.reason == "stopped"


# -- devices the shim can add ------------------------------------------------


@dataclass(frozen=True)
class BlockDevice:
    """A raw disk image as virtio-blk (virtio 1.2, 5.2)."""

    dev_id: str
    path: Path
    read_only: bool = False


@dataclass(frozen=True)
class NetDevice:
    """A host tap device as virtio-net (virtio 1.2, 5.1)."""

    dev_id: str
    tap_name: str
    mac: str
    # an fd already attached to the tap (opened inside the pod netns by katapy.resource.network);
    # the VMM uses it instead of opening the tap by name in its own netns
    tap_fd: int | None = None


Device = BlockDevice | NetDevice


class Hypervisor(abc.ABC):
    """One sandbox VM.  An instance drives exactly one VM, once."""

    name: str = ""

    @abc.abstractmethod
    async def start_vm(self, cfg: VmConfig) -> None:
        """Create the state directory, start the VMM and the vCPUs; returns once the VM runs."""

    @abc.abstractmethod
    async def stop_vm(self) -> None:
        """Stop the VM (hard power-off; the agent was told to shut down before, if at all)."""

    @abc.abstractmethod
    async def pause_vm(self) -> None:
        """Stop the vCPUs without losing state."""

    @abc.abstractmethod
    async def resume_vm(self) -> None:
        """Run the vCPUs again after pause_vm."""

    @abc.abstractmethod
    async def add_device(self, dev: Device) -> None:
        """Attach a device (before start_vm: cold-plug; after: hotplug where supported, returning once
        the guest has bound its driver)."""

    @abc.abstractmethod
    async def remove_device(self, dev_id: str) -> None:
        """Detach a device added with add_device (after start_vm: hot-unplug where supported; every
        host fd the device held, the disk image's or the tap's, is released when it returns)."""

    @abc.abstractmethod
    def guest_device_address(self, dev_id: str) -> int:
        """The guest-physical base of the virtio-mmio window of the block/net device ``dev_id``
        (cold- or hot-plugged; the VM started).  HypervisorError for an unknown id; UnsupportedError
        where the VMM places its devices itself (QEMU)."""

    @abc.abstractmethod
    async def resize_vcpus(self, n: int) -> int:
        """Give the guest ``n`` vCPUs (1..max_vcpus, VM running); returns the count it may now online.

        The VMM's half of a resize: creating or parking vCPUs.  Onlining them in
        the guest is the agent's (``SetOnlineCPUs``); ``katapy.resource.cpu``
        orders the two, as Kata runtime-rs's resource manager does.
        """

    @abc.abstractmethod
    async def resize_memory(self, mib: int) -> int:
        """Make the guest's memory ``mib`` MiB; returns the size now present."""

    @abc.abstractmethod
    def state(self) -> VmState:
        """Where the VM is in its life cycle."""

    @abc.abstractmethod
    def agent_socket(self) -> Path:
        """The hybrid-vsock unix socket the agent client dials (``CONNECT <port>``)."""

    @abc.abstractmethod
    async def wait_exit(self) -> VmExit:
        """Return when the VM (or its VMM) has ended, with the reason."""

    @abc.abstractmethod
    def metrics(self) -> dict[str, float | int | str]:
        """Numbers about the VMM: pid, RSS, boot timings, console size."""

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Stop whatever still runs and remove the state directory; safe at any time, idempotent."""
