"""katapy pod annotations and CRI sizing annotations against [hypervisor] limits."""
from __future__ import annotations

import pytest

from katapy.config import HypervisorConfig
from katapy.shim import annotations as ann
from katapy.shim.errors import InvalidArgument

HV = HypervisorConfig(default_vcpus=1, default_memory=256, max_vcpus=4, max_memory=2048)


def test_defaults_without_annotations():
    assert ann.sandbox_sizing({}, HV) == ann.SandboxSizing(1, 256, "")


def test_katapy_annotations_within_limits():
    s = ann.sandbox_sizing({ann.VCPUS: "2", ann.MEMORY: "512", ann.KERNEL_PARAMS: "loglevel=7 quiet"}, HV)
    assert s == ann.SandboxSizing(2, 512, "loglevel=7 quiet", base_vcpus=2)


@pytest.mark.parametrize("key,value,message", [
    (ann.VCPUS, "64", r"default_vcpus='64': more vCPUs than the configuration allows \(\[hypervisor\] max_vcpus = 4\)"),
    (ann.VCPUS, "0", "must be at least 1"),
    (ann.VCPUS, "two", "not an integer"),
    (ann.MEMORY, "4096", r"max_memory = 2048 MiB"),
    (ann.MEMORY, "16", "must be at least 64"),
    (ann.KERNEL_PARAMS, "a\nb", "one line"),
    (ann.KERNEL_PARAMS, "katapy.agent_port=9", "'katapy.agent_port=9' is set by katapy"),
    (ann.KERNEL_PARAMS, "maxcpus=8", "'maxcpus=8' is set by katapy"),
    ("io.katapy.config.hypervisor.default_vcpu", "2", "unknown katapy annotation"),
])
def test_bad_annotations_name_key_and_value(key, value, message):
    with pytest.raises(ann.AnnotationError, match=message) as info:
        ann.sandbox_sizing({key: value}, HV)
    assert key in str(info.value)
    assert isinstance(info.value, InvalidArgument)  # the shim answers InvalidArgument


def test_cri_sizing_adds_to_the_base():
    s = ann.sandbox_sizing({ann.CRI_CPU_QUOTA: "150000", ann.CRI_CPU_PERIOD: "100000",
                            ann.CRI_MEMORY: str(300 * (1 << 20) + 1)}, HV)
    assert (s.vcpus, s.memory_mib) == (1 + 2, 256 + 301)
    assert s.base_vcpus == 1  # what katapy.resource.cpu sizes the containers' limits from, live


def test_cri_sizing_unlimited_quota_adds_nothing():
    s = ann.sandbox_sizing({ann.CRI_CPU_QUOTA: "-1", ann.CRI_CPU_PERIOD: "100000", ann.CRI_MEMORY: "0"}, HV)
    assert (s.vcpus, s.memory_mib) == (1, 256)


def test_cri_sizing_beyond_max_is_refused():
    with pytest.raises(ann.AnnotationError, match="sandbox-cpu-quota=800000.*max_vcpus = 4"):
        ann.sandbox_sizing({ann.CRI_CPU_QUOTA: "800000", ann.CRI_CPU_PERIOD: "100000"}, HV)
    with pytest.raises(ann.AnnotationError, match="sandbox-memory=.*max_memory = 2048"):
        ann.sandbox_sizing({ann.CRI_MEMORY: str(4 << 30)}, HV)
