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


def katapy_config_file(base: Path, default_memory: int = 512, hypervisor: str = "qemu") -> Path:
    """A katapy configuration for the CRI tests: the ``hypervisor`` backend (qemu | builtin), the guest artifacts."""
    cfg = base / "katapy-configuration.toml"
    cfg.write_text(f"""[hypervisor]
name = "{hypervisor}"
kernel = "{paths.guest_bzimage()}"
initrd = "{paths.guest_initramfs()}"
default_vcpus = 1
default_memory = {default_memory}
max_vcpus = 4
max_memory = 2048

[agent]
dial_timeout = 120.0
request_timeout = 240.0  # the harness's L2 guest is slow: no set-up request may be cut short by the default
""")
    return cfg


def katapy_unavailable(hypervisor: str = "qemu") -> str | None:
    """Why katapy pods on ``hypervisor`` cannot run here (guest artifacts, QEMU, KVM, a back end missing), or None."""
    from katapy import config as kconfig
    from katapy.testing.sandbox import missing_requirements

    base = Path(tempfile.mkdtemp(prefix="kpcfg-"))
    try:
        return missing_requirements(kconfig.load(katapy_config_file(base, hypervisor=hypervisor), check_files=False))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _private_cri_containerd(hypervisor: str, client_timeout: float = 120.0) -> Iterator:
    _need_host_tools()
    from katapy.testing.cri import PrivateCriContainerd

    base = Path(tempfile.mkdtemp(prefix="kpcri-", dir="/tmp"))
    c = PrivateCriContainerd(base, katapy_config=katapy_config_file(base, hypervisor=hypervisor),
                             client_timeout=client_timeout)
    try:
        c.start()
        c.import_images()
        yield c
    finally:
        keep = os.environ.get("KATAPY_CRI_KEEP_LOG")  # a directory to copy containerd's (and the shims') log to
        if keep and c.log_path.exists():
            shutil.copy(c.log_path, Path(keep) / f"containerd-{hypervisor}.log")
        c.cleanup()


@pytest.fixture(scope="module")
def cri_containerd() -> Iterator:
    """A private containerd with CRI, CNI bridge, runc and katapy runtimes (katapy on QEMU), images imported."""
    yield from _private_cri_containerd("qemu")


@pytest.fixture(scope="module")
def cri_containerd_builtin() -> Iterator:
    """The same, with handler katapy on the built-in VMM (hardware KVM, or the nested KVM harness's L1)."""
    # in the nested harness the whole stack runs under TCG: the L1's containerd, CNI and the Python shim
    # are ~10x slower than on a host, and RunPodSandbox measured over kubelet's default 2 min there
    yield from _private_cri_containerd("builtin", client_timeout=600.0)
