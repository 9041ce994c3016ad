from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .containerd import PrivateContainerd

IMAGE = "docker.io/katapy/busybox:latest"


def _need_tools() -> None:
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="module")
def containerd() -> Iterator[PrivateContainerd]:
    """A private containerd (module-scoped: starting one costs ~1 s) with the busybox image imported."""
    _need_tools()
    from katapy.testing.busybox_image import build

    base = Path(tempfile.mkdtemp(prefix="katapy-ctrd-", dir="/tmp"))
    c = PrivateContainerd(base)
    try:
        c.start()
        c.import_image(build(base / "busybox.tar", IMAGE))
        yield c
    finally:
        c.cleanup()
