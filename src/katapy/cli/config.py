"""`katapy config`: show the effective configuration, or switch the default one.

    katapy config show [--config PATH]   effective configuration as TOML, with its source
    katapy config use NAME [--force]     point <config dir>/configuration.toml at
                                         configuration-NAME.toml (builtin | qemu | auto)
    katapy config list                   the configuration files available

``use`` is kata-manager's ``-S``: the per-hypervisor files sit side by side
and ``configuration.toml`` is a symlink to one of them.  A file missing from
the config directory is installed from the repository's configs/.  ``use
auto`` links the file of the backend ``katapy check`` would pick on this host.
A configuration.toml that is a regular file (hand-edited) is only replaced
with --force, after it is saved as configuration.toml.bak.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from katapy import config, paths

NAMES = ("builtin", "qemu")


def _shipped(name: str) -> Path:
    return paths.REPO_ROOT / "configs" / f"configuration-{name}.toml"


def use(name: str, force: bool = False, config_dir: Path | None = None) -> Path:
    """Make ``configuration.toml`` in ``config_dir`` a link to ``configuration-<name>.toml``; return the target."""
    if name == "auto":
        from katapy.hypervisor.selection import decide

        name = decide("auto").name
    if name not in NAMES:
        raise config.ConfigError(f"no configuration named {name!r} (choose from {', '.join(NAMES)} or auto)")
    d = config_dir or paths.config_dir()
    d.mkdir(parents=True, exist_ok=True)
    target = d / f"configuration-{name}.toml"
    if not target.exists():
        src = _shipped(name)
        if not src.exists():
            raise config.ConfigError(f"{target} does not exist and there is no {src} to install")
        shutil.copyfile(src, target)
    config.load(target, check_files=False)  # refuse to switch to a file that does not validate
    link = d / "configuration.toml"
    if link.exists() and not link.is_symlink():
        if not force:
            raise config.ConfigError(f"{link} is a regular file (edited by hand?); use --force to replace it")
        os.replace(link, d / "configuration.toml.bak")
    tmp = d / ".configuration.toml.new"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    os.replace(tmp, link)  # atomic: a reader sees the old link or the new one
    return target


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="katapy config", description="show or switch katapy's configuration")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print the effective configuration as TOML")
    show.add_argument("--config", type=Path, help="read this file instead of the default")
    u = sub.add_parser("use", help="switch configuration.toml to configuration-NAME.toml")
    u.add_argument("name", help="builtin | qemu | auto")
    u.add_argument("--force", action="store_true", help="replace a hand-edited configuration.toml (saved as .bak)")
    sub.add_parser("list", help="list the configuration files in the config directory")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "show":
            cfg = config.load(args.config, check_files=False)
            from katapy.hypervisor.selection import decide

            d = decide(cfg.hypervisor.name)
            print(f"# source: {cfg.source or 'built-in defaults'}")
            print(f"# hypervisor on this host: {d.name} (accel {d.accel}): {d.reason}")
            for problem in config.file_problems(cfg):
                print(f"# problem: {problem}")
            print(config.to_toml(cfg), end="")
        elif args.cmd == "use":
            target = use(args.name, force=args.force)
            print(f"{paths.config_dir() / 'configuration.toml'} -> {target.name}")
        else:
            d = paths.config_dir()
            link = d / "configuration.toml"
            current = os.readlink(link) if link.is_symlink() else None
            for p in sorted(d.glob("configuration-*.toml")):
                print(("* " if p.name == current else "  ") + str(p))
    except config.ConfigError as exc:
        print(f"katapy config: {exc}", file=sys.stderr)
        return 1
    return 0
