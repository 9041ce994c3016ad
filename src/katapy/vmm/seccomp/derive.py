"""``python -m katapy.vmm.seccomp.derive DIR``: the syscalls each VMM thread class made, from an strace log.

How the allow-lists in ``filters`` were derived (docs/hypervisor.md, "Seccomp"):
run the VMM's tests with filtering off under ``strace -ff -o DIR/trace``
(one file per thread, ``DIR/trace.<tid>``).  ``seccomp.install`` names each
VMM thread with ``prctl(PR_SET_NAME, "katapy-vcpu0")`` before it would load a
filter, so a thread's file says which class it is, and every syscall after
that line is one the filter must allow.  This prints, per class, each
syscall with its count, the ioctl requests, socket families and open flags
seen, and what is seen but not on the list (``filters.rules``) or listed
but never seen.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

_NAME = re.compile(r'prctl\(PR_SET_NAME, "([^"]*)"')
_CALL = re.compile(r"^(?:\d+:\d+:\d+\.\d+ )?(?:<\.\.\. )?([a-z_0-9]+)(?:\(| resumed>)")


#: EventLoop names: the VMM's, the vhost-user back end's, and the tests' own loops
LOOP_NAMES = ("katapy-devices", "vhost-user-", "vsock-fuzz", "test-")


def thread_class(comm: str) -> str | None:
    """The class of a thread ``seccomp.install`` named (``katapy-vcpuN``, an EventLoop's name), or None for
    another thread that names itself (trio's workers: ``Trio thread N``, ``<function> from <task>``)."""
    if comm.startswith("katapy-vcpu"):
        return "vcpu"
    if comm.startswith(LOOP_NAMES):
        return "devices"
    return None


def _lives(f) -> list[tuple[str, list[tuple[str, str]]]]:
    """The VMM threads in one ``trace.<tid>`` file: (class, [(syscall, args)]) each.  A tid can be reused
    by a later thread, and strace then appends to the same file: a thread's life ends at ``+++ exited``."""
    lives: list[tuple[str, list[tuple[str, str]]]] = []
    cls: str | None = None
    calls: list[tuple[str, str]] = []
    for line in f:
        if line.startswith("+++"):
            if cls is not None:
                lives.append((cls, calls))
            cls, calls = None, []
            continue
        m = _NAME.search(line)
        if m:  # a (trio worker) thread can be renamed; only the installer's names start a VMM life
            if cls is not None:
                lives.append((cls, calls))
            cls, calls = thread_class(m.group(1)), []
            continue
        if cls is None:
            continue
        if line.startswith(("---", "<...")):
            continue  # a signal, or a resumed call (counted at its start)
        m = _CALL.match(line)
        if m:
            calls.append((m.group(1), line[line.find("(") + 1:]))
    if cls is not None:
        lives.append((cls, calls))
    return lives


def scan(directory: str) -> dict[str, dict[str, collections.Counter[str]]]:
    """class -> {"syscalls" | "ioctl" | "socket" | "openat": Counter}."""
    out: dict[str, dict[str, collections.Counter[str]]] = collections.defaultdict(
        lambda: collections.defaultdict(collections.Counter))
    for fn in sorted(os.listdir(directory)):
        with open(os.path.join(directory, fn), errors="replace") as f:
            lives = _lives(f)
        for cls, calls in lives:
            # with filtering on, the installer's own calls (no_new_privs, sigaction, seccomp) come first
            loaded = [i for i, (name, _) in enumerate(calls) if name == "seccomp"]
            if loaded:
                calls = calls[loaded[0] + 1:]
            seen = out[cls]
            for name, args in calls:
                seen["syscalls"][name] += 1
                if name == "ioctl":
                    seen["ioctl"][args.split(", ")[1].split(")")[0] if ", " in args else args] += 1
                elif name == "socket":
                    seen["socket"][args.split(",")[0]] += 1
                elif name == "openat":
                    parts = args.split(", ")
                    seen["openat"][parts[2].split(")")[0] if len(parts) > 2 else "?"] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m katapy.vmm.seccomp.derive", description=__doc__.split("\n")[0])
    ap.add_argument("directory", help="the directory of an `strace -ff -o DIR/trace` run")
    a = ap.parse_args(argv)
    from katapy.vmm.seccomp import filters

    found = scan(a.directory)
    for cls, seen in sorted(found.items()):
        listed = {r.name for r in filters.rules(filters.ThreadClass(cls), pid=0)}
        print(f"== {cls}")
        for what in ("syscalls", "ioctl", "socket", "openat"):
            if seen[what]:
                print(f"  {what}: " + ", ".join(f"{k} {v}" for k, v in sorted(seen[what].items())))
        print("  seen, not listed: " + (", ".join(sorted(set(seen["syscalls"]) - listed)) or "none"))
        print("  listed, not seen: " + (", ".join(sorted(listed - set(seen["syscalls"]))) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
