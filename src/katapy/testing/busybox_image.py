"""A small busybox OCI image built locally (no registry is reachable) for ``ctr images import``.

Layout per the OCI image spec (image-layout.md, manifest.md, config.md): one
gzip'd tar layer holding busybox-static and its applet links, an image config
(linux/amd64, ``sh`` as the default command), a manifest, and ``index.json``
whose manifest carries ``io.containerd.image.name`` so containerd 1.6's
importer names the image.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
DEFAULT_NAME = "docker.io/katapy/busybox:latest"
_DIRS = ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "var", "run", "mnt", "home")


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    return [a for a in out.split() if a and a != "busybox"]


def _layer(busybox: Path) -> bytes:
    buf = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in _DIRS:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755, now
            tar.addfile(info)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(data), 0o755, now
        tar.addfile(info, io.BytesIO(data))
        for applet in _applets(busybox):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode, link.mtime = tarfile.SYMTYPE, "busybox", 0o777, now
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        group = b"root:x:0:\nnogroup:x:65534:\n"
        for name, content in (("etc/passwd", passwd), ("etc/group", group)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, now
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def build(out_tar: Path, name: str = DEFAULT_NAME, busybox: Path = BUSYBOX,
          entrypoint: list[str] | None = None, user: str | None = None) -> Path:
    """Write an OCI image-layout tar at ``out_tar``; returns it.  ``entrypoint``: the config's Entrypoint
    (e.g. ``["sleep", "inf"]`` for a CRI pause image); default none, Cmd ``sh``.  ``user``: the config's
    User (image-spec config.md: "uid", "uid:gid", or a name), which ``ctr run`` puts in process.user."""
    work = out_tar.with_suffix(".d")
    blobs = work / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    raw = _layer(busybox)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    layer_digest, layer_size = _blob(blobs, gzip.compress(raw, mtime=0))
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    if entrypoint is not None:
        config["config"]["Entrypoint"], config["config"]["Cmd"] = list(entrypoint), []
    if user is not None:
        config["config"]["User"] = user
    config_digest, config_size = _blob(blobs, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": layer_size}],
    }
    manifest_digest, manifest_size = _blob(blobs, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                       "size": manifest_size, "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}],
    }
    (work / "index.json").write_text(json.dumps(index))
    (work / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    with tarfile.open(out_tar, "w") as tar:
        for item in ("oci-layout", "index.json", "blobs"):
            tar.add(work / item, arcname=item)
    return out_tar


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("busybox-oci.tar")))
