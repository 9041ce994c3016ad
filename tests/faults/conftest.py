from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.shim.containerd import PrivateContainerd, private_containerd, require_guest


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    """One private containerd per module (the faults share it; each test cleans up what it started)."""
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    require_guest()
    with private_containerd() as c:
        yield c
