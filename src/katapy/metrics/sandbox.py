"""What one shim knows about its sandbox, as Prometheus metric families.

The shim fills a :class:`SandboxSample` on each scrape (``sample()`` runs on
the endpoint's thread, so it only reads plain attributes); :func:`families`
turns it into families, :func:`render` into the text exposition format
(version 0.0.4).  The sandbox id is not a label here: one endpoint serves one
sandbox, and ``katapy monitor`` adds ``sandbox_id`` (and the pod's name and
namespace where known) when it aggregates.

Families (gauges unless ``_total``):

* ``katapy_sandbox_up``: 1 while the VM runs and the agent answers;
* ``katapy_sandbox_info{hypervisor,vm_state}``: always 1;
* ``katapy_sandbox_containers``: containers in the sandbox;
* ``katapy_hypervisor_vcpus``, ``katapy_hypervisor_memory_bytes``: the VM's size now (live resize);
* ``katapy_hypervisor_boot_seconds{phase}``: the start steps (VM start, agent connect, CreateSandbox);
* ``katapy_{shim,hypervisor}_{resident_memory_bytes,threads,open_fds,cpu_seconds_total}``: the shim's
  process and the VMM's (the same process with the builtin backend: then ``katapy_hypervisor_*`` is
  the shim's own, as Kata's Dragonball runs inside its shim);
* from inside the built-in VMM only (absent, not zero, for ``qemu``, whose exits and devices katapy
  cannot see): ``katapy_hypervisor_vm_exits_total{reason}`` (KVM_RUN returns by reason,
  katapy.vmm.vcpu.EXIT_REASONS), ``katapy_hypervisor_virtio_requests_total{device,queue}`` (descriptor
  chains completed) and ``katapy_hypervisor_virtio_bytes_total{device,queue,direction}`` (``read``: the
  device-readable bytes of those chains; ``write``: the lengths the device wrote back).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from katapy.metrics import procfs

if TYPE_CHECKING:
    from katapy.vmm.state import QueueCounts


@dataclass(frozen=True)
class SandboxSample:
    """One sandbox as its shim sees it at one instant."""

    hypervisor: str  # the backend: "builtin" | "qemu"
    vm_state: str  # katapy.hypervisor.base.VmState value
    up: bool  # the VM runs and the agent connection is open
    vcpus: int
    memory_bytes: int
    containers: int
    shim_pid: int
    vmm_pid: int
    boot_seconds: dict[str, float] = field(default_factory=dict)
    # the built-in VMM's own counters; None where the backend has none (qemu): the families are left out
    vm_exits: Mapping[str, int] | None = None
    virtio: Sequence[QueueCounts] | None = None


def _process(prefix: str, what: str, stats: procfs.ProcessStats | None) -> Iterator[Metric]:
    if stats is None:
        return
    yield _gauge(f"{prefix}_resident_memory_bytes", f"Resident memory of {what}, bytes.", stats.resident_bytes)
    yield _gauge(f"{prefix}_threads", f"Threads of {what}.", stats.threads)
    yield _gauge(f"{prefix}_open_fds", f"Open file descriptors of {what}.", stats.open_fds)
    c = CounterMetricFamily(f"{prefix}_cpu_seconds", f"User and system CPU time of {what}, seconds.")
    c.add_metric([], stats.cpu_seconds)
    yield c


UP_HELP = "1 when the sandbox VM runs and its agent connection is open."


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def families(s: SandboxSample, proc: str = "/proc") -> Iterator[Metric]:
    yield _gauge("katapy_sandbox_up", UP_HELP, int(s.up))
    info = GaugeMetricFamily("katapy_sandbox_info", "The sandbox's hypervisor backend and VM state; always 1.",
                             labels=["hypervisor", "vm_state"])
    info.add_metric([s.hypervisor, s.vm_state], 1)
    yield info
    yield _gauge("katapy_sandbox_containers", "Containers in the sandbox.", s.containers)
    yield _gauge("katapy_hypervisor_vcpus", "vCPUs the VM has now (boot size, then each live resize).", s.vcpus)
    yield _gauge("katapy_hypervisor_memory_bytes", "RAM the VM has now (boot size plus hot-added), bytes.",
                 s.memory_bytes)
    if s.boot_seconds:
        boot = GaugeMetricFamily("katapy_hypervisor_boot_seconds", "Seconds each sandbox start step took.",
                                 labels=["phase"])
        for phase, secs in sorted(s.boot_seconds.items()):
            boot.add_metric([phase], secs)
        yield boot
    yield from _vmm_counters(s)
    shim = procfs.read(s.shim_pid, proc)
    yield from _process("katapy_shim", "the shim process", shim)
    vmm = shim if s.vmm_pid == s.shim_pid else procfs.read(s.vmm_pid, proc)
    yield from _process("katapy_hypervisor", "the VMM process", vmm)


def _vmm_counters(s: SandboxSample) -> Iterator[Metric]:
    if s.vm_exits is not None:
        exits = CounterMetricFamily("katapy_hypervisor_vm_exits", "KVM_RUN returns of all vCPUs, by exit reason.",
                                    labels=["reason"])
        for reason, n in s.vm_exits.items():
            exits.add_metric([reason], n)
        yield exits
    if s.virtio is not None:
        reqs = CounterMetricFamily("katapy_hypervisor_virtio_requests",
                                   "Descriptor chains each virtio queue completed.", labels=["device", "queue"])
        moved = CounterMetricFamily("katapy_hypervisor_virtio_bytes",
                                    "Bytes of those chains: read = device-readable (driver to device), "
                                    "write = written by the device.", labels=["device", "queue", "direction"])
        for q in s.virtio:
            queue = str(q.queue)
            reqs.add_metric([q.device, queue], q.requests)
            moved.add_metric([q.device, queue, "read"], q.read_bytes)
            moved.add_metric([q.device, queue, "write"], q.written_bytes)
        yield reqs
        yield moved


class _Once(Collector):
    def __init__(self, fams: Iterable[Metric]) -> None:
        self._fams = list(fams)

    def collect(self) -> Iterable[Metric]:
        return self._fams


def render(fams: Iterable[Metric]) -> bytes:
    """The families in the Prometheus text format (``text/plain; version=0.0.4``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Once(fams))
    return generate_latest(registry)


def scrape(sample: Callable[[], SandboxSample | None], extra: Callable[[], Iterable[Metric]] = tuple) -> bytes:
    """One scrape: ``sample()`` (None: the sandbox is not started or already gone: only
    ``katapy_sandbox_up 0``) and the ``extra()`` families, rendered."""
    s = sample()
    fams = families(s) if s is not None else [_gauge("katapy_sandbox_up", UP_HELP, 0)]
    return render([*fams, *extra()])
