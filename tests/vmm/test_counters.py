"""The built-in VMM's own counters: vCPU exits by reason, virtio requests and bytes per queue.

Unit level (a scripted vCPU, a driver-built virtqueue, the device manager without KVM) and one tiny
flat guest on real KVM whose exits are counted and exposed as ``katapy_hypervisor_vm_exits_total``
that ``promtool check metrics`` accepts.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import typing

import pytest

from katapy.metrics.sandbox import SandboxSample, families, render
from katapy.vmm.bus import Bus
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.kvm import exits
from katapy.vmm.memory import GuestMemory
from katapy.vmm.state import ExitReason
from katapy.vmm.vcpu import _EXIT_SLOT, EXIT_REASONS, VcpuThread
from katapy.vmm.virtio.device import VIRTIO_ID_BLOCK
from katapy.vmm.virtio.queue import VIRTQ_DESC_F_NEXT, Queue
from tests.virtio.driver import DriverQueue
from tests.vmm.guestasm import assemble
from tests.vmm.recording_device import RecordingDevice


# -- vCPU exits -----------------------------------------------------------------------------------

def test_every_exit_type_has_a_named_slot():
    assert set(_EXIT_SLOT) == set(typing.get_args(exits.VcpuExit))
    assert sorted(_EXIT_SLOT.values()) == list(range(len(EXIT_REASONS)))


class _ScriptedVcpu:
    """Plays a list of exits, then HLT (which ends a 1-vCPU thread through on_halt)."""

    index = 0

    def __init__(self, script: list[exits.VcpuExit]):
        self.script = [*script, exits.Hlt()]

    def run(self) -> exits.VcpuExit:
        return self.script.pop(0)

    def set_immediate_exit(self, on: bool) -> None:
        pass

    def complete_io_in(self, data: bytes) -> None:
        pass

    def complete_mmio_read(self, data: bytes) -> None:
        pass


def test_a_vcpu_thread_counts_each_exit_by_reason():
    script = [exits.IoOut(0x80, 1, b"x"), exits.IoOut(0x80, 1, b"y"), exits.IoIn(0x80, 1),
              exits.MmioRead(0xD000_0000, 4), exits.MmioWrite(0xD000_0000, b"\0" * 4),
              exits.Interrupted(), exits.IoapicEoi(33)]
    halted: list[int] = []
    t = VcpuThread(_ScriptedVcpu(script), Bus("pio"), Bus("mmio"), lambda e: None, halted.append)  # type: ignore[arg-type]
    t.start()
    assert t.join(5)
    assert halted == [0]
    got = dict(zip(EXIT_REASONS, t.exits))
    assert {k: v for k, v in got.items() if v} == {
        "io_out": 2, "io_in": 1, "mmio_read": 1, "mmio_write": 1, "interrupted": 1, "ioapic_eoi": 1, "hlt": 1}
    assert t.exit_count == 7  # kicks (Interrupted) are not guest exits


# -- virtqueues -----------------------------------------------------------------------------------

@pytest.fixture
def mem():
    with GuestMemory.create([(0, 1 << 20)]) as m:
        yield m


def test_a_queue_counts_the_chains_it_completes_and_their_bytes(mem):
    drv = DriverQueue(mem, 0x1000, 0x10000, 0x40000, size=16)
    state = drv.state()
    q = Queue(mem, state)
    for i in range(5):
        drv.add_chain([(b"h" * 16, False), (bytes(100 + i), False), (512, True)])
    done = 0
    while (chain := q.pop()) is not None:
        q.add_used(chain.head, chain.writable_len - done)  # lengths 512, 511, ...
        done += 1
    assert (state.requests, state.read_bytes, state.written_bytes) == (5, 5 * 116 + 10, 5 * 512 - 10)
    # a driver reset keeps the counters (they cover the device's life); a new Queue goes on from them
    state.reset()
    assert (state.requests, state.read_bytes, state.written_bytes) == (5, 5 * 116 + 10, 5 * 512 - 10)


def test_a_malformed_chain_counts_as_a_request_with_nothing_read(mem):
    drv = DriverQueue(mem, 0x1000, 0x10000, 0x40000, size=16)
    state = drv.state()
    q = Queue(mem, state)
    head = drv.add_chain([(b"z" * 64, False)])
    assert q.pop_valid(_NoLog()) is not None
    q.add_used(head, 0)
    bad = drv.add_chain([(b"a" * 8, False)])
    drv.write_desc(drv.desc, bad, 0x10000, 8, VIRTQ_DESC_F_NEXT, 99)  # next outside the table
    assert q.pop_valid(_NoLog()) is None  # completed empty inside pop_valid
    assert (state.requests, state.read_bytes, state.written_bytes) == (2, 64, 0)


class _NoLog:
    def warning(self, *args: object, **kw: object) -> None:
        pass


class _Blk(RecordingDevice):
    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = (128,)


def test_device_manager_names_devices_and_reports_each_queue():
    from katapy.vmm.device_manager import MmioDeviceManager

    with GuestMemory.create([(0, 16 << 20)]) as m:
        loop = EventLoop()
        loop.start()
        dm = MmioDeviceManager(None, m, Bus("mmio"), loop)
        try:
            a, b, c = _Blk(), RecordingDevice(), _Blk()
            for d in (a, b, c):
                dm.add(d)
            dm.reserve_hotplug(1)
            hot = dm.populate(_Blk())
            dm.find(c).transport.queues[0].requests = 7  # type: ignore[union-attr]
            got = [(q.device, q.queue, q.requests) for q in dm.queue_counts()]
            assert got == [("virtio-blk-0", 0, 0), ("virtio-42-0", 0, 0), ("virtio-42-0", 1, 0),
                           ("virtio-blk-1", 0, 7), ("virtio-blk-2", 0, 0)]
            dm.depopulate(hot.base)
            dm.populate(_Blk())  # a new device in the same slot: a new name, never blk-2's counters
            assert [q.device for q in dm.queue_counts()][-1] == "virtio-blk-3"
        finally:
            loop.stop()
            dm.close()
            loop.close()


# -- the exposition -------------------------------------------------------------------------------

def _promtool_ok(text: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def _sample(**kw: typing.Any) -> SandboxSample:
    return SandboxSample("builtin", "running", True, 1, 16 << 20, 0, os.getpid(), os.getpid(), **kw)


def test_qemu_samples_have_no_vmm_counter_families():
    names = {f.name for f in families(_sample())}
    assert not {n for n in names if n.startswith(("katapy_hypervisor_vm_exits", "katapy_hypervisor_virtio"))}


#: 5 bytes to COM1 (nobody listens), then the i8042 reset line
_FIVE_OUTS_THEN_RESET = r"""
.code16
    mov $5, %cx
    mov $0x3f8, %dx
1:  mov $'k', %al
    out %al, %dx
    loop 1b
    mov $0xfe, %al
    out %al, $0x64
    hlt
"""


def test_a_flat_guest_moves_the_exit_counters_and_the_exposition_is_valid(vmm):
    """Real KVM (kvm-pvm suffices): 5 bytes to COM1, then the i8042 reset; the counters see the OUTs."""
    from katapy.vmm.state import QueueCounts

    vmm.configure_machine(1, 16)
    vmm.set_flat_boot(assemble(_FIVE_OUTS_THEN_RESET))
    assert vmm.exit_counts() == dict.fromkeys(EXIT_REASONS, 0)
    vmm.start()
    ended = vmm.wait(10)
    assert ended is not None and ended.reason is ExitReason.RESET, ended
    counts = vmm.exit_counts()
    assert counts["io_out"] >= 6  # 5 to the UART, 1 to the i8042 (the kernel may add more)
    assert set(counts) == set(EXIT_REASONS)
    assert vmm.virtio_counts() == []  # no devices
    virtio = [QueueCounts("virtio-blk-0", 0, 3, 48, 4099)]
    body = render(families(_sample(vm_exits=counts, virtio=virtio)))
    _promtool_ok(body)
    text = body.decode()
    assert f'katapy_hypervisor_vm_exits_total{{reason="io_out"}} {float(counts["io_out"])}' in text
    assert 'katapy_hypervisor_virtio_requests_total{device="virtio-blk-0",queue="0"} 3.0' in text
    assert 'katapy_hypervisor_virtio_bytes_total{device="virtio-blk-0",direction="read",queue="0"} 48.0' in text
    assert 'katapy_hypervisor_virtio_bytes_total{device="virtio-blk-0",direction="write",queue="0"} 4099.0' in text
    vmm.stop()
    assert vmm.exit_counts() == counts  # stopping keeps what was counted


