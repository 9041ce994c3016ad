from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from katapy import paths


def _need_host_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("CRI tests need root (netns, CNI bridge)")
    for tool in ("containerd", "ctr", "runc", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    for plugin in ("bridge", "host-local", "loopback"):
        if not (Path("/usr/lib/cni") / plugin).exists():
            pytest.skip(f"CNI plugin /usr/lib/cni/{plugin} is missing (containernetworking-plugins)")


def katapy_config_file(base: Path, default_memory: int = 512) -> Path:
    """A katapy configuration for the CRI tests: QEMU backend, the lead's guest artifacts."""
    cfg = base / "katapy-configuration.toml"
    cfg.write_text(f"""[hypervisor]
name = "qemu"
kernel = "{paths.guest_bzimage()}"
initrd = "{paths.guest_initramfs()}"
default_vcpus = 1
default_memory = {default_memory}
max_vcpus = 2
max_memory = 2048

[agent]
dial_timeout = 120.0
""")
    return cfg


def katapy_unavailable() -> str | None:
    """Why katapy pods cannot run here (guest artifacts, QEMU, a device back end missing), or None."""
    from katapy import config as kconfig
    from katapy.testing.sandbox import missing_requirements

    base = Path(tempfile.mkdtemp(prefix="kpcfg-"))
    try:
        return missing_requirements(kconfig.load(katapy_config_file(base), check_files=False))
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cri_containerd() -> Iterator:
    """A private containerd with CRI, CNI bridge, runc and katapy runtimes, images imported."""
    _need_host_tools()
    from katapy.testing.cri import PrivateCriContainerd

    base = Path(tempfile.mkdtemp(prefix="kpcri-", dir="/tmp"))
    c = PrivateCriContainerd(base, katapy_config=katapy_config_file(base))
    try:
        c.start()
        c.import_images()
        yield c
    finally:
        c.cleanup()
