"""Where katapy keeps things on the host.

Slow builds (guest kernel, guest image) are cached outside the repository,
keyed by a hash of their inputs, under ``KATAPY_CACHE`` (default
``/var/cache/katapy``).  ``artifacts/`` holds stable links to the newest build
of each artifact, which the shipped configuration files point at.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    return Path(os.environ.get("KATAPY_CACHE", "/var/cache/katapy"))


def artifacts_dir() -> Path:
    """Stable names for the current guest artifacts (symlinks into the cache)."""
    return cache_dir() / "artifacts"


def guest_vmlinux() -> Path:
    return artifacts_dir() / "vmlinux"


def guest_bzimage() -> Path:
    return artifacts_dir() / "bzImage"


def guest_initramfs() -> Path:
    return artifacts_dir() / "katapy-initramfs.cpio"


def harness_vmlinux() -> Path:
    """ELF of the harness's L1 kernel (its symbols tell the L1 watch where the L1 resumes after VMRUN)."""
    return artifacts_dir() / "harness-vmlinux"


def harness_bzimage() -> Path:
    """Kernel of the nested KVM harness's L1 VM (guest fragment + KVM + 9p)."""
    return artifacts_dir() / "harness-bzImage"


def state_dir() -> Path:
    """Per-sandbox runtime state (sockets, pid files); one subdirectory each."""
    return Path(os.environ.get("KATAPY_STATE", "/run/katapy"))


def config_dir() -> Path:
    return Path(os.environ.get("KATAPY_CONFIG_DIR", "/etc/katapy"))
