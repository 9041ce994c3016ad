from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from .containerd import PrivateContainerd, private_containerd


def _need_tools() -> None:
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    """A private containerd (module-scoped: starting one costs ~1 s) with the busybox image imported."""
    _need_tools()
    with private_containerd() as c:
        yield c
