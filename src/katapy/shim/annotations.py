"""Pod annotations that size and tune a sandbox VM, checked against the configuration.

katapy's own annotations (Kata's ``io.katacontainers.config.hypervisor.*``
under katapy's prefix; containerd passes them only when the runtime's
``pod_annotations`` lists ``io.katapy.*``):

* ``io.katapy.config.hypervisor.default_vcpus``  integer, 1..[hypervisor] max_vcpus
* ``io.katapy.config.hypervisor.default_memory`` integer MiB, 64..[hypervisor] max_memory
* ``io.katapy.config.hypervisor.kernel_params``  one line, appended to the guest command line;
  katapy's own ``katapy.*``/``console=``/``maxcpus=`` parameters cannot be overridden

Any other ``io.katapy.`` key is an error (a typo must not be silently ignored).

CRI pod sizing (containerd's CRI plugin sets these on the sandbox container):
``io.kubernetes.cri.sandbox-cpu-quota`` / ``sandbox-cpu-period`` (CFS, microseconds) and
``io.kubernetes.cri.sandbox-memory`` (bytes).  As Kata's static sandbox sizing does, the
pod's limits are *added* to the base size: vcpus = base + ceil(quota / period),
memory = base + ceil(bytes / MiB); the result must still fit the configured maxima.
The VM boots with that many vCPUs online; ``katapy.resource.cpu`` keeps it at least
that large and sizes it live from the containers' own limits, starting from the base
(``SandboxSizing.base_vcpus``), so the pod's limits are not counted twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from katapy.shim.errors import InvalidArgument

if TYPE_CHECKING:
    from katapy.config import HypervisorConfig

PREFIX = "io.katapy."
VCPUS = "io.katapy.config.hypervisor.default_vcpus"
MEMORY = "io.katapy.config.hypervisor.default_memory"
KERNEL_PARAMS = "io.katapy.config.hypervisor.kernel_params"
KNOWN = (VCPUS, MEMORY, KERNEL_PARAMS)

CRI_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
CRI_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
CRI_MEMORY = "io.kubernetes.cri.sandbox-memory"

MIN_MEMORY_MIB = 64
MIB = 1 << 20
RESERVED_PARAMS = ("katapy.", "console=", "panic=", "reboot=", "maxcpus=")


class AnnotationError(InvalidArgument):
    """An annotation's value is not allowed; the message names the annotation and the value."""


@dataclass(frozen=True)
class SandboxSizing:
    """What the annotations ask of the sandbox VM."""

    vcpus: int  # online at boot: base_vcpus plus the CRI pod sizing
    memory_mib: int
    kernel_params: str = ""
    base_vcpus: int = 1  # the sandbox's default vCPUs (configuration or annotation), before the CRI sizing


def _int(annotations: dict[str, str], key: str, low: int, high: int | None, why_high: str = "") -> int | None:
    raw = annotations.get(key)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except (ValueError, AttributeError):
        raise AnnotationError(f"annotation {key}={raw!r}: not an integer") from None
    if value < low:
        raise AnnotationError(f"annotation {key}={raw!r}: must be at least {low}")
    if high is not None and value > high:
        raise AnnotationError(f"annotation {key}={raw!r}: {why_high}")
    return value


def _kernel_params(raw: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise AnnotationError(f"annotation {KERNEL_PARAMS}={raw!r}: must be one line of printable text")
    for word in raw.split():
        if word.startswith(RESERVED_PARAMS):
            raise AnnotationError(f"annotation {KERNEL_PARAMS}={raw!r}: {word!r} is set by katapy and cannot "
                                  "be overridden")
    return raw.strip()


def sandbox_sizing(annotations: dict[str, str], hv: HypervisorConfig) -> SandboxSizing:
    """Validate the annotations against ``hv`` ([hypervisor] of katapy's configuration); raise AnnotationError."""
    for key in annotations:
        if key.startswith(PREFIX) and key not in KNOWN:
            raise AnnotationError(f"annotation {key}: unknown katapy annotation (known: {', '.join(KNOWN)})")
    vcpus = _int(annotations, VCPUS, 1, hv.max_vcpus,
                 f"more vCPUs than the configuration allows ([hypervisor] max_vcpus = {hv.max_vcpus})")
    memory = _int(annotations, MEMORY, MIN_MEMORY_MIB, hv.max_memory,
                  f"more memory than the configuration allows ([hypervisor] max_memory = {hv.max_memory} MiB)")
    vcpus = vcpus if vcpus is not None else hv.default_vcpus
    base_vcpus = vcpus
    memory = memory if memory is not None else hv.default_memory

    quota = _int(annotations, CRI_CPU_QUOTA, -1, None)
    period = _int(annotations, CRI_CPU_PERIOD, 0, None)
    if quota is not None and quota > 0 and period:
        extra = math.ceil(quota / period)
        if vcpus + extra > hv.max_vcpus:
            raise AnnotationError(
                f"annotation {CRI_CPU_QUOTA}={quota} (period {period}): the pod needs {extra} vCPUs on top of "
                f"{vcpus}, more than [hypervisor] max_vcpus = {hv.max_vcpus}")
        vcpus += extra
    pod_bytes = _int(annotations, CRI_MEMORY, 0, None)
    if pod_bytes:
        extra_mib = math.ceil(pod_bytes / MIB)
        if memory + extra_mib > hv.max_memory:
            raise AnnotationError(
                f"annotation {CRI_MEMORY}={pod_bytes}: the pod needs {extra_mib} MiB on top of {memory}, "
                f"more than [hypervisor] max_memory = {hv.max_memory} MiB")
        memory += extra_mib
    params = _kernel_params(annotations.get(KERNEL_PARAMS, ""))
    return SandboxSizing(vcpus=vcpus, memory_mib=memory, kernel_params=params, base_vcpus=base_vcpus)
