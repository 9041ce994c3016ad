"""A virtio device back end that records what the transport does to it (the transport is under test)."""
from __future__ import annotations

import threading

from katapy.vmm.virtio.device import VIRTIO_F_VERSION_1, DeviceError, VirtioDevice


class RecordingDevice(VirtioDevice):
    device_type = 0x2A  # an unassigned id: no guest driver will bind to it
    queue_max_sizes = (256, 64)

    def __init__(self, fail_activate: bool = False):
        super().__init__()
        self.fail_activate = fail_activate
        self.activations: list[list[tuple[int, int, int, int]]] = []
        self.resets = 0
        self.config = bytearray(b"KATAPYCF")
        self.activated = threading.Event()
        self.kick_fds: list[int] = []
        self.interrupt = None
        self.threads: list[tuple[str, str]] = []  # (call, thread name) for activate/reset

    def avail_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1 | 1 << 0

    def config_space(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        if 0 <= offset and offset + len(data) <= len(self.config):
            self.config[offset : offset + len(data)] = data

    def activate(self, mem, queues, kick_fds, interrupt, loop) -> None:
        if self.fail_activate:
            raise DeviceError("refusing on purpose")
        self.activations.append([(q.size, q.desc_table, q.avail_ring, q.used_ring) for q in queues])
        self.threads.append(("activate", threading.current_thread().name))
        self.kick_fds = list(kick_fds)
        self.interrupt = interrupt
        self.activated.set()

    def reset(self) -> None:
        self.resets += 1
        self.threads.append(("reset", threading.current_thread().name))
