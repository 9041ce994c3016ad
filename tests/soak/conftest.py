"""The soak tests' containerds: the fault suite's private containerd (``ctr``) and one with CRI, both
module-scoped and stopped with everything they ran however the tests end."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cri.conftest import _private_cri_containerd, katapy_unavailable
from tests.faults.conftest import containerd  # noqa: F401  (the fixture, shared)


@pytest.fixture(scope="module")
def cri_containerd() -> Iterator:
    why = katapy_unavailable("qemu")
    if why:
        pytest.skip(f"katapy pods on qemu cannot run here: {why}")
    yield from _private_cri_containerd("qemu")
