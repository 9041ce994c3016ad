"""The shim's command line, Go ``flag`` syntax (containerd v1.6 ``runtime/v2/shim/shim.go`` parseFlags).

``-namespace ns -address /run/containerd/containerd.sock -publish-binary
/usr/bin/containerd -id ID [-bundle DIR] [-debug] [-socket PATH] [start|delete]``;
``-flag value``, ``-flag=value`` and ``--flag`` all work; no action = daemon.
"""
from __future__ import annotations

from dataclasses import dataclass

_STRING_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}
_BOOL_FLAGS = {"debug", "v"}
ACTIONS = ("start", "delete")


class UsageError(ValueError):
    """The command line does not parse."""


@dataclass
class ShimArgs:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    debug: bool = False
    version: bool = False
    action: str = ""  # "start" | "delete" | "" (daemon)


def parse(argv: list[str]) -> ShimArgs:
    out = ShimArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            rest = argv[i + 1:] if arg != "--" else argv[i + 2:]
            action = arg if arg != "--" else (argv[i + 1] if i + 1 < len(argv) else "")
            if action not in ACTIONS or rest:
                raise UsageError(f"unknown action {' '.join(argv[i:])!r} (expected start or delete)")
            out.action = action
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            flag = value.lower() not in ("false", "0") if eq else True
            if name == "debug":
                out.debug = flag
            else:
                out.version = flag
        elif name in _STRING_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(out, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    return out
