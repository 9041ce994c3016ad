"""A container's root filesystem, prepared on the host and shared into the guest.

containerd hands the shim the snapshot as ``CreateTaskRequest.rootfs`` mounts
(for overlayfs: ``type=overlay source=overlay options=[lowerdir=..,upperdir=..,
workdir=..]``; docs/protocols.md §2).  katapy mounts them at
``<shared_dir>/<cid>/rootfs`` on the host; the virtio-fs share exports that
as ``/run/katapy/shared/<cid>/rootfs`` in the guest (docs/protocols.md §4).  With no
mounts (``ctr run --rootfs``), the spec's ``root.path`` (relative to the
bundle) is bind-mounted there instead.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from katapy import log
from katapy.resource import mounts

GUEST_SHARED_DIR = "/run/katapy/shared"
SUPPORTED_TYPES = ("overlay", "bind", "rbind")


class RootfsError(ValueError):
    """The rootfs cannot be prepared; the message says which mount or path."""


@dataclass(frozen=True)
class RootfsMount:
    """One containerd rootfs mount (containerd.types.Mount)."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rootfs:
    """A prepared rootfs: where it is on the host and what the guest calls it."""

    container_id: str
    host_path: Path
    guest_path: str


def container_dir(shared_dir: Path, container_id: str) -> Path:
    return shared_dir / container_id


def guest_rootfs_path(container_id: str) -> str:
    return f"{GUEST_SHARED_DIR}/{container_id}/rootfs"


def check(bundle: Path, spec_root: str, rootfs_mounts: list[RootfsMount]) -> Path | None:
    """Validate before anything is created; returns the directory to bind when there are no mounts."""
    if len(rootfs_mounts) > 1:
        raise RootfsError(f"{len(rootfs_mounts)} rootfs mounts given; katapy supports exactly one")
    if rootfs_mounts:
        m = rootfs_mounts[0]
        if m.type not in SUPPORTED_TYPES:
            raise RootfsError(f"rootfs mount type {m.type!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
        if m.type == "overlay":
            for opt in m.options:
                key, _, value = opt.partition("=")
                dirs = value.split(":") if key == "lowerdir" else [value] if key in ("upperdir", "workdir") else []
                for d in dirs:
                    if not Path(d).is_dir():
                        raise RootfsError(f"rootfs overlay {key} {d} does not exist")
        elif not Path(m.source).is_dir():
            raise RootfsError(f"rootfs bind source {m.source} does not exist")
        return None
    if not spec_root:
        raise RootfsError("config.json has no root.path and containerd sent no rootfs mounts")
    path = Path(spec_root) if os.path.isabs(spec_root) else bundle / spec_root
    if not path.is_dir():
        raise RootfsError(f"rootfs {path} does not exist or is not a directory")
    return path


def prepare(shared_dir: Path, container_id: str, bundle: Path, spec_root: str,
            rootfs_mounts: list[RootfsMount]) -> Rootfs:
    """Mount the rootfs at ``<shared_dir>/<cid>/rootfs``; undone by :func:`release`."""
    source_dir = check(bundle, spec_root, rootfs_mounts)
    target = container_dir(shared_dir, container_id) / "rootfs"
    target.mkdir(parents=True, exist_ok=True)
    try:
        if source_dir is not None:
            mounts.bind(source_dir, target)
        else:
            m = rootfs_mounts[0]
            flags, data = mounts.split_options(list(m.options))
            if m.type == "overlay":
                mounts.mount("overlay", target, "overlay", flags & ~mounts.MS_BIND, data)
            else:
                mounts.bind(Path(m.source), target, read_only=bool(flags & mounts.MS_RDONLY))
    except BaseException:
        release(shared_dir, container_id)
        raise
    log.get("resource.rootfs").info("rootfs mounted", container_id=container_id, target=str(target))
    return Rootfs(container_id, target, guest_rootfs_path(container_id))


def release(shared_dir: Path, container_id: str) -> None:
    """Unmount everything under ``<shared_dir>/<cid>`` and remove the directory; idempotent."""
    cdir = container_dir(shared_dir, container_id)
    mounts.unmount_all_under(cdir)
    left = mounts.mount_points_under(cdir)
    if left:
        raise mounts.MountError(16, f"still mounted after unmount: {', '.join(map(str, left))}")
    if cdir.exists():
        shutil.rmtree(cdir, ignore_errors=False)
