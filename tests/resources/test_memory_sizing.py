"""Kata's memory sizing rule (katapy.resource.memory) and MemoryResource against a recording hypervisor."""
from __future__ import annotations

import pytest
import trio

from katapy.hypervisor.base import HypervisorError, UnsupportedError, VmState
from katapy.resource.cpu import ResizeError
from katapy.resource.memory import MemoryPolicy, MemoryResource, memory_limit_mib, memory_target

MIB = 1 << 20
POLICY = MemoryPolicy(base=256, floor=256, max_mib=2048)


@pytest.mark.parametrize("resources,want", [
    (None, None), ({}, None), ({"memory": {}}, None), ({"memory": {"limit": 0}}, None),
    ({"memory": {"limit": -1}}, None), ({"memory": {"limit": True}}, None),
    ({"memory": {"limit": 512 * MIB}}, 512), ({"memory": {"limit": 512 * MIB + 1}}, 513),
])
def test_memory_limit_from_oci_resources(resources, want):
    assert memory_limit_mib(resources) == want


def test_target_is_base_plus_limits_in_whole_blocks_and_capped():
    assert memory_target(POLICY, []).mib == 256
    assert memory_target(POLICY, [1]).mib == 256 + 128  # rounded up to one block
    assert memory_target(POLICY, [700, 324]).mib == 256 + 1024
    t = memory_target(POLICY, [4096])
    assert (t.mib, t.wanted, t.capped) == (256 + 14 * 128, 4352, True)
    # the boot size (pod annotations) is a floor; the limits count from the base, never twice
    assert memory_target(MemoryPolicy(base=256, floor=768, max_mib=2048), [512]).mib == 768
    assert memory_target(MemoryPolicy(base=256, floor=768, max_mib=2048), [600]).mib == 768 + 128


class FakeHypervisor:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[int] = []
        self.error = error
        self.memory_mib = 256

    def state(self) -> VmState:
        return VmState.RUNNING

    async def resize_memory(self, mib: int) -> int:
        self.calls.append(mib)
        if self.error is not None:
            raise self.error
        self.memory_mib = mib
        return mib


def test_resource_grows_shrinks_and_keeps_memory_a_guest_cannot_give_back():
    async def main() -> None:
        hv = FakeHypervisor()
        r = MemoryResource(POLICY, hv, "t")
        assert await r.set_container("a", {"memory": {"limit": 1024 * MIB}}) == 1280
        assert await r.set_container("b", {"cpu": {"quota": 1}}) == 1280  # no memory limit: nothing changes
        assert await r.set_container("a", {"memory": {"limit": 128 * MIB}}) == 384
        assert hv.calls == [1280, 384]
        hv.error = HypervisorError("the guest refused: Device or resource busy")
        with pytest.raises(ResizeError, match="refused"):
            await r.set_container("a", {"memory": {}}, strict=True)
        assert r.limits == {"a": 128}  # a failed resize records nothing
        assert await r.remove_container("a") == 384  # logged, the container still goes
        assert r.limits == {}

    trio.run(main)


def test_backend_without_hotplug_warns_on_create_and_refuses_an_update():
    async def main() -> None:
        hv = FakeHypervisor(UnsupportedError("resize_memory 256 -> 384 MiB: QEMU microvm has no memory hotplug"))
        r = MemoryResource(POLICY, hv, "t")
        assert await r.set_container("a", {"memory": {"limit": 100 * MIB}}) == 256
        assert "no memory hotplug" in r.unsupported
        with pytest.raises(ResizeError, match="no memory hotplug"):
            await r.set_container("a", {"memory": {"limit": 200 * MIB}}, strict=True)

    trio.run(main)
