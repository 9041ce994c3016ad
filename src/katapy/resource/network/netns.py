"""Run code inside a network namespace named by a path (``/var/run/netns/cni-...``).

setns(2) with CLONE_NEWNET changes the namespace of the calling *thread*
only, so each call runs on a fresh thread that enters the namespace, does its
work (netlink sockets, /dev/net/tun opens: both bind to the namespace current
at socket/open time) and ends; the caller's threads never leave the host
namespace.  A file descriptor opened there (a tap) stays tied to that
namespace wherever it is used later, which is how QEMU gets its tap.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from katapy.resource.network.types import NetworkError

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path: str) -> int:
    """An O_RDONLY fd of the namespace file; NetworkError when it is gone or not a netns."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetworkError(f"pod network namespace {path} does not exist (deleted by CNI/containerd?)") from None
    except OSError as exc:
        raise NetworkError(f"pod network namespace {path}: cannot open: {exc.strerror}") from None


def run_in_netns(path: str, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` on a new thread inside the network namespace at ``path``; return or raise its result."""
    fd = open_netns(path)
    result: list[Any] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            try:
                _setns(fd)
            except OSError as exc:
                why = "not a network namespace" if exc.errno == errno.EINVAL else exc.strerror
                raise NetworkError(f"pod network namespace {path}: setns failed: {why}") from None
            result.append(fn(*args))
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    try:
        t = threading.Thread(target=body, name="katapy-netns", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if failure:
        raise failure[0]
    return result[0]


def netns_path_from_spec(spec: dict[str, Any]) -> str | None:
    """The OCI spec's ``linux.namespaces`` network path (runtime-spec config-linux.md, "Namespaces").

    None when the container has no network namespace entry (host network) or
    an entry without a path (the runtime would make an empty one): both mean
    there is no CNI-made netns to carry into the VM.
    """
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            path = ns.get("path")
            return str(path) if path else None
    return None
