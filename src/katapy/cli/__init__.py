"""The `katapy` command line.

Each subcommand lives in its own module ``katapy.cli.<name>`` exposing
``main(argv: list[str]) -> int``; it is imported only when asked for, so
``katapy check`` does not pay for importing the VMM or the shim.
"""
from __future__ import annotations

import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("katapy.cli.check", "say whether this host can run katapy, and how"),
    "env": ("katapy.cli.env", "print katapy's environment (paths, versions, configuration) as TOML"),
    "config": ("katapy.cli.config", "show the active configuration or switch it (config use <name>)"),
    "osbuilder": ("katapy.osbuilder.__main__", "build the guest kernel and the guest image"),
    "vmm": ("katapy.cli.vmm", "boot a kernel with the built-in VMM from a JSON/TOML description"),
    "sandbox": ("katapy.cli.sandbox", "start a sandbox VM and talk to its agent (health check)"),
    "harness": ("katapy.testing.harness", "run a command inside the nested KVM harness VM"),
    "exec": ("katapy.cli.console", "a shell or a command in a sandbox's VM (needs debug_console = true)"),
    "monitor": ("katapy.cli.monitor", "serve every sandbox's Prometheus metrics on HOST:PORT (kata-monitor)"),
}


def _usage() -> str:
    lines = ["usage: katapy <command> [args...]", "", "commands:"]
    width = max(len(n) for n in COMMANDS)
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version", "version"):
        from katapy import __version__

        print(f"katapy {__version__}")
        return 0
    entry = COMMANDS.get(args[0])
    if entry is None:
        print(f"katapy: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from katapy import log

    log.configure(level=os.environ.get("KATAPY_LOG", "warning"))
    module = importlib.import_module(entry[0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
