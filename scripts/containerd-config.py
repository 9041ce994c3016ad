#!/usr/bin/env python3
"""Merge katapy's CRI runtime stanza (configs/containerd-katapy.toml) into a containerd config.

    scripts/containerd-config.py [--config /etc/containerd/config.toml] [--katapy-config PATH] [--dry-run]

* no file yet: writes ``version = 2`` and the stanza;
* the katapy runtime already configured (same or different settings): leaves the
  file untouched and says so (idempotent: never a second stanza);
* otherwise: copies the file to ``<file>.katapy-backup-<UTC time>``, appends the
  stanza (plugin names for the file's config version: 2 ``"io.containerd.grpc.v1.cri"``,
  1 ``cri``), checks the result still parses as TOML, writes it.
Then prints how to restart containerd.  Exit status 0 on success (changed or
not), 1 on an error (nothing written).  Standard library only.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STANZA = REPO / "configs" / "containerd-katapy.toml"
DEFAULT_CONFIG = Path("/etc/containerd/config.toml")
DEFAULT_KATAPY_CONFIG = "/etc/katapy/configuration.toml"
V2_PLUGIN = 'plugins."io.containerd.grpc.v1.cri"'
V1_PLUGIN = "plugins.cri"


class MergeError(Exception):
    pass


def stanza_text(version: int, katapy_config: str) -> str:
    """The stanza for a config of ``version``, with ConfigPath set to ``katapy_config``."""
    text = STANZA.read_text()
    text = text.replace(f'ConfigPath = "{DEFAULT_KATAPY_CONFIG}"', f'ConfigPath = "{katapy_config}"')
    if version < 2:
        text = text.replace(V2_PLUGIN, V1_PLUGIN)
    return text


def katapy_runtime(doc: dict, version: int) -> dict | None:
    """The katapy runtime table, None when absent; MergeError when a table on the way is not a table."""
    node: object = doc
    for key in ("plugins", "io.containerd.grpc.v1.cri" if version >= 2 else "cri", "containerd", "runtimes"):
        if not isinstance(node, dict):
            raise MergeError(f"cannot add the katapy runtime: {key!r}'s parent is not a table")
        node = node.get(key, {})
    if not isinstance(node, dict):
        raise MergeError("cannot add the katapy runtime: 'runtimes' is not a table; appending would break the file")
    found = node.get("katapy")
    return found if isinstance(found, dict) else None


def merge(existing: str | None, katapy_config: str) -> tuple[str | None, str]:
    """(new text or None when nothing changes, what happened)."""
    if existing is None:
        return "version = 2\n\n" + stanza_text(2, katapy_config), "created with the katapy runtime"
    try:
        doc = tomllib.loads(existing)
    except tomllib.TOMLDecodeError as exc:
        raise MergeError(f"the existing file is not valid TOML: {exc}") from None
    version = int(doc.get("version", 1))
    if version > 2:
        raise MergeError(f"config version {version} is not supported by this script (1 or 2 only)")
    current = katapy_runtime(doc, version)
    if current is not None:
        wanted = katapy_runtime(tomllib.loads(stanza_text(version, katapy_config)), version)
        if current == wanted:
            return None, "the katapy runtime is already configured (unchanged)"
        return None, ("a katapy runtime is already configured with other settings; left unchanged "
                      f"(compare with {STANZA})")
    merged = existing.rstrip("\n") + "\n\n" + stanza_text(version, katapy_config)
    try:
        if katapy_runtime(tomllib.loads(merged), version) is None:
            raise MergeError("the merged file does not define the katapy runtime")
    except tomllib.TOMLDecodeError as exc:
        raise MergeError(f"appending the stanza would break the file ({exc}); add it by hand") from None
    return merged, f"katapy runtime added (config version {version})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="containerd config.toml to update")
    ap.add_argument("--katapy-config", default=DEFAULT_KATAPY_CONFIG, help="ConfigPath given to the katapy shim")
    ap.add_argument("--dry-run", action="store_true", help="print the result, write nothing")
    args = ap.parse_args(argv)
    path: Path = args.config
    try:
        existing = path.read_text() if path.exists() else None
        new, what = merge(existing, args.katapy_config)
    except (MergeError, OSError) as exc:
        print(f"containerd-config: {path}: {exc}", file=sys.stderr)
        return 1
    if new is not None and args.dry_run:
        print(new)
    elif new is not None:
        if existing is not None:
            backup = path.with_name(f"{path.name}.katapy-backup-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            shutil.copy2(path, backup)
            print(f"containerd-config: backed up {path} to {backup}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".katapy-tmp")
        tmp.write_text(new)
        tmp.replace(path)
    print(f"containerd-config: {path}: {what}")
    if new is not None and not args.dry_run:
        print("restart containerd to use it:  systemctl restart containerd   "
              "(or stop and start the containerd process), then check with:  crictl info | grep katapy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
