"""The interface between a virtio device back end and its transport.

A device (vsock, blk, net, fs) is written once against this interface and is
plugged into either transport:

* the built-in VMM's virtio-mmio transport (``katapy.vmm.virtio.mmio``), where
  queue kicks are KVM ioeventfds and interrupts go through an irqfd after the
  transport sets InterruptStatus;
* the vhost-user back-end server (``katapy.vmm.virtio.vhost_user``), where
  QEMU sends kick and call eventfds and the memory table.

In both cases the device sees the same things: guest memory, one
:class:`QueueState` per queue, one kick eventfd per queue (readable when the
driver notified), an :class:`Interrupt` to signal the driver, and an
:class:`~katapy.vmm.eventloop.EventLoop` to register its fds with.

Spec: virtio 1.2, section 2 (Basic Facilities of a Virtio Device) and 4.2.3
(MMIO device operation); vhost-user protocol, "Ring states".
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass

from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory

# Device IDs, virtio 1.2 section 5.
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_VSOCK = 19
VIRTIO_ID_FS = 26

# Reserved feature bits, virtio 1.2 section 6.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33


@dataclass
class QueueState:
    """What the driver programmed for one virtqueue (virtio 1.2, 2.7 split queues)."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc_table: int = 0  # guest-physical addresses
    avail_ring: int = 0
    used_ring: int = 0
    event_idx: bool = False  # VIRTIO_F_EVENT_IDX negotiated
    # vhost-user may tell a back end where to resume (VHOST_USER_SET_VRING_BASE)
    next_avail: int = 0
    next_used: int = 0
    # counters kept by Queue.add_used (katapy.vmm.virtio.queue); reset() keeps them: they cover the
    # device's life, not one driver session
    requests: int = 0  # chains completed
    read_bytes: int = 0  # their device-readable bytes
    written_bytes: int = 0  # the used lengths

    def reset(self) -> None:
        self.size = 0
        self.ready = False
        self.desc_table = self.avail_ring = self.used_ring = 0
        self.next_avail = self.next_used = 0


class Interrupt(abc.ABC):
    """How a device tells the driver something changed."""

    @abc.abstractmethod
    def signal_used_queue(self, queue_index: int) -> None:
        """Buffers were added to queue ``queue_index``'s used ring."""

    @abc.abstractmethod
    def signal_config_change(self) -> None:
        """The device configuration space changed."""

    def signal_needs_reset(self, reason: str) -> None:
        """The driver broke the device (a corrupt ring): it stops until the driver resets it.

        A transport with a status register sets DEVICE_NEEDS_RESET and tells the driver (2.1.2);
        vhost-user has no such message, so there the device only stops (and has logged why).
        """


class EventFdInterrupt(Interrupt):
    """Interrupts as eventfd writes (vhost-user call fds); one fd per queue."""

    def __init__(self, call_fds: dict[int, int], config_fd: int | None = None):
        self.call_fds = call_fds
        self.config_fd = config_fd

    def signal_used_queue(self, queue_index: int) -> None:
        fd = self.call_fds.get(queue_index)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def signal_config_change(self) -> None:
        if self.config_fd is not None:
            os.eventfd_write(self.config_fd, 1)


class DeviceError(Exception):
    """The device cannot go on: the transport marks it DEVICE_NEEDS_RESET."""


class VirtioDevice(abc.ABC):
    """A virtio device back end (Firecracker's ``VirtioDevice`` trait, in Python)."""

    #: virtio device ID (section 5)
    device_type: int
    #: maximum size of each queue, in queue order
    queue_max_sizes: tuple[int, ...]

    def __init__(self) -> None:
        self.acked_features = 0
        self.broken = False  # set when the guest gave something impossible

    # -- features and config space (defaults suit most devices) -----------
    def avail_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def ack_features(self, features: int) -> None:
        """Record the features the driver accepted (a subset of ``avail_features``)."""
        self.acked_features = features & self.avail_features()

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def config_space(self) -> bytes:
        """The device-specific configuration layout (section 5.x.4)."""
        return b""

    def read_config(self, offset: int, length: int) -> bytes:
        cfg = self.config_space()
        if offset < 0 or length < 0 or offset + length > len(cfg):
            return bytes(length)  # out of range: read as zeros, never an exception
        return cfg[offset : offset + length]

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver writes to config space; most devices ignore them."""

    # -- life cycle -----------------------------------------------------------
    @abc.abstractmethod
    def activate(
        self,
        mem: GuestMemory,
        queues: list[QueueState],
        kick_fds: list[int],
        interrupt: Interrupt,
        loop: EventLoop,
    ) -> None:
        """The driver set DRIVER_OK: start serving the queues.

        ``kick_fds[i]`` becomes readable when the driver notifies queue ``i``;
        the device registers it (and its own back-end fds) with ``loop``.
        The fds stay owned by the transport.
        """

    @abc.abstractmethod
    def reset(self) -> None:
        """The driver wrote 0 to Status (or the front end stopped the rings):
        stop serving, unregister from the loop, drop guest memory references."""

    def close(self) -> None:
        """The VMM is going away: release back-end resources (sockets, files)."""
        self.reset()
