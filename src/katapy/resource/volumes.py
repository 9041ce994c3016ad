"""Volumes from the OCI spec's ``mounts`` (runtime-spec config.md "Mounts"), shared into the guest.

A bind mount's source lives on the host, so katapy bind-mounts it under the
container's share directory (``<shared_dir>/<cid>/mounts/<n>``) and rewrites
the mount's source to the guest path of that directory; the guest's crun then
binds it into the container.  Kernel file systems (proc, sysfs, devpts,
mqueue, cgroup, tmpfs, ...) are created by the guest itself and pass through
unchanged.  Host paths under /proc, /sys and /dev are not shared (they would
describe the host, not the guest); a bind of /dev/shm becomes a guest tmpfs.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from katapy import log
from katapy.resource import mounts
from katapy.resource.rootfs import GUEST_SHARED_DIR, container_dir

_HOST_ONLY = ("/proc", "/sys", "/dev")


class VolumeError(ValueError):
    """A spec mount is malformed or its source is missing."""


@dataclass
class SharedVolumes:
    """The rewritten spec mounts and the host mount points made for them."""

    spec_mounts: list[dict[str, Any]]
    host_mounts: list[Path] = field(default_factory=list)


def _is_bind(m: dict[str, Any]) -> bool:
    opts = m.get("options") or []
    return m.get("type") in ("bind", "rbind") or "bind" in opts or "rbind" in opts


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


# Bind-mount options asking for mount propagation between host and container (mount(8) "shared
# subtree"); containerd's CRI plugin sets rslave for HostToContainer and rshared for Bidirectional.
_PROPAGATION_FROM_HOST = {"rshared": "Bidirectional", "shared": "Bidirectional",
                          "rslave": "HostToContainer", "slave": "HostToContainer"}


def validate(spec_mounts: Any) -> list[dict[str, Any]]:
    """Check the shape of ``spec["mounts"]``, that bind sources exist and ask for no propagation from the host."""
    if spec_mounts is None:
        return []
    if not isinstance(spec_mounts, list):
        raise VolumeError(f"config.json mounts must be a list, not {type(spec_mounts).__name__}")
    for i, m in enumerate(spec_mounts):
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str) or not m["destination"]:
            raise VolumeError(f"config.json mounts[{i}] has no destination")
        opts = m.get("options", [])
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise VolumeError(f"config.json mounts[{i}] ({m['destination']}): options must be a list of strings")
        if _is_bind(m):
            shared = [o for o in opts if o in _PROPAGATION_FROM_HOST]
            if shared:
                raise VolumeError(
                    f"bind mount {m['destination']}: mount propagation {shared[0]!r} (CRI "
                    f"{_PROPAGATION_FROM_HOST[shared[0]]}) is not supported by katapy: the volume reaches the "
                    "pod VM through virtio-fs, which carries files, not mount events, so mounts made later on "
                    "either side would never show on the other; use the default (private) propagation")
            src = m.get("source")
            if not isinstance(src, str) or not os.path.isabs(src):
                raise VolumeError(f"bind mount {m['destination']}: source {src!r} is not an absolute path")
            if not _under(src, _HOST_ONLY) and not os.path.exists(src):
                raise VolumeError(f"bind mount {m['destination']}: source {src} does not exist")
    return spec_mounts


def share(shared_dir: Path, container_id: str, spec_mounts: Any) -> SharedVolumes:
    """Bind each host bind-mount source into the share; return the guest-facing mounts."""
    result = SharedVolumes(spec_mounts=[])
    mdir = container_dir(shared_dir, container_id) / "mounts"
    logger = log.get("resource.volumes", container_id=container_id)
    try:
        for i, m in enumerate(validate(spec_mounts)):
            m = copy.deepcopy(m)
            if not _is_bind(m):
                result.spec_mounts.append(m)
                continue
            src = m["source"]
            if src == "/dev/shm" or m["destination"] == "/dev/shm":
                result.spec_mounts.append({"destination": m["destination"], "type": "tmpfs", "source": "shm",
                                           "options": ["nosuid", "noexec", "nodev", "mode=1777"]})
                continue
            if _under(src, _HOST_ONLY):
                logger.info("host-only bind mount not shared", source=src, destination=m["destination"])
                continue
            name = f"{i}-{Path(src).name or 'root'}"
            target = mdir / name
            mdir.mkdir(parents=True, exist_ok=True)
            if os.path.isdir(src):
                target.mkdir(exist_ok=True)
            else:
                target.touch(exist_ok=True)
            read_only = "ro" in (m.get("options") or [])
            mounts.bind(Path(src), target, read_only=read_only)
            result.host_mounts.append(target)
            m["source"] = f"{GUEST_SHARED_DIR}/{container_id}/mounts/{name}"
            m["type"] = "bind"
            if "rbind" not in m.get("options", []) and "bind" not in m.get("options", []):
                m.setdefault("options", []).append("rbind")
            result.spec_mounts.append(m)
            logger.info("volume shared", source=src, destination=m["destination"], guest_source=m["source"])
    except BaseException:
        unshare(result)
        raise
    return result


def unshare(volumes: SharedVolumes) -> None:
    """Undo :func:`share`'s host mounts (rootfs.release also sweeps the whole directory)."""
    for target in reversed(volumes.host_mounts):
        mounts.unmount(target)
    volumes.host_mounts.clear()
