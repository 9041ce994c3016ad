"""A leak census for the soak tests (issue 19): what the host and one private containerd hold, counted.

``take(c)`` counts, for ``c`` (a ``PrivateContainerd`` or ``PrivateCriContainerd``: anything with ``proc``,
``base`` and ``katapy_state``, and for CRI ``net.bridge``) and for the whole host: katapy shim and QEMU
processes, all processes, containerd's threads, open fds and RSS, mounts, network namespaces, tap and veth
links, katapy cgroups and the entries of the katapy state directory.  ``grown(before, after)`` names every
count that went up.

The ``host_*`` counts see every other user of the machine too (another session's shell, its unit tests'
processes and mounts); the tests print them but assert only on the counts that are this containerd's own
and on the host-wide ones that only a katapy sandbox or a CNI pod makes (``STRICT``).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.shim.containerd import shim_pids

CGROUPS = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/var/run/netns")


@dataclass(frozen=True)
class Census:
    # this containerd's own
    shims: int  # katapy shim processes with its KATAPY_STATE
    qemus: int  # qemu-system processes whose command line names its katapy state
    processes: int  # containerd, its descendants, and every process with its KATAPY_STATE
    containerd_threads: int
    containerd_fds: int
    containerd_rss_kib: int
    mounts: int  # mount points under its test directory or its katapy state
    bridge_ports: int  # links enslaved to its CNI bridge (the pods' host-side veths); 0 without CNI
    state_entries: int  # entries of its katapy state directory
    # the host's
    host_shims: int  # containerd-shim-katapy-v2 / ``katapy.shim.main`` processes
    host_qemus: int  # qemu-system-x86_64 processes
    host_processes: int
    host_mounts: int
    host_netns: int  # ``ip netns list``
    host_netns_files: int  # /var/run/netns entries
    host_taps_veths: int  # ``ip -o -d link`` links of kind tap or veth
    host_katapy_cgroups: int  # /sys/fs/cgroup/katapy/* and /sys/fs/cgroup/*/katapy/*

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


# what the soak tests hold at zero growth (the other host-wide counts are printed only; containerd's threads,
# fds and RSS get their own bounds: Go keeps the OS threads its scheduler once started)
STRICT = ("shims", "qemus", "processes", "mounts", "bridge_ports", "state_entries",
          "host_shims", "host_qemus", "host_netns", "host_netns_files", "host_taps_veths", "host_katapy_cgroups")


def grown(before: Census, after: Census, fields: tuple[str, ...] = STRICT) -> dict[str, tuple[int, int]]:
    """The counts of ``fields`` that went up from ``before`` to ``after``: name -> (before, after)."""
    return {f: (getattr(before, f), getattr(after, f)) for f in fields if getattr(after, f) > getattr(before, f)}


def take(c: Any) -> Census:
    pid = c.proc.pid
    procs = _processes()
    state = str(c.katapy_state)
    marker = f"KATAPY_STATE={state}".encode()
    ours = _descendants(pid, procs) | {p for p, (_, argv) in procs.items() if state.encode() in argv}
    ours |= {p for p in procs if _has_env(p, marker)}
    qemus = [p for p, (_, argv) in procs.items() if b"qemu-system" in argv.split(b"\0")[0]]
    mounts = _mount_points()
    bridge = getattr(getattr(c, "net", None), "bridge", None)
    return Census(
        shims=len(shim_pids(c.katapy_state)),
        qemus=sum(1 for p in qemus if p in ours),
        processes=len(ours),
        containerd_threads=_status_kib(pid, "Threads"),
        containerd_fds=fd_count(pid),
        containerd_rss_kib=rss_kib(pid),
        mounts=sum(1 for m in mounts if m.startswith((str(c.base), state))),
        bridge_ports=len(_ip("-o", "link", "show", "master", bridge).splitlines()) if bridge else 0,
        state_entries=len(list(c.katapy_state.iterdir())) if c.katapy_state.exists() else 0,
        host_shims=sum(1 for _, argv in procs.values() if _is_shim(argv)),
        host_qemus=len(qemus),
        host_processes=len(procs),
        host_mounts=len(mounts),
        host_netns=len(_ip("netns", "list").splitlines()),
        host_netns_files=len(list(NETNS_DIR.iterdir())) if NETNS_DIR.exists() else 0,
        host_taps_veths=sum(1 for ln in _ip("-o", "-d", "link").splitlines() if " veth " in ln or "tun type tap" in ln),
        host_katapy_cgroups=sum(1 for p in [*CGROUPS.glob("katapy/*"), *CGROUPS.glob("*/katapy/*")] if p.is_dir()),
    )


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` (/proc/<pid>/status), KiB."""
    return _status_kib(pid, "VmRSS")


def private_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssShmem) of ``pid``, KiB.  The shim's own memory is RssAnon: its VmRSS also counts the
    guest RAM it maps shared (the memfd of ``memory-backend-memfd``, for its vhost-user back ends),
    which grows as the guest touches its memory -- guest use, bounded by the VM's size, not a leak."""
    return _status_kib(pid, "RssAnon"), _status_kib(pid, "RssShmem")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (ppid, cmdline) for every process that is still there while it is read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        out[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), argv)  # comm may hold spaces and parens
    return out


def _descendants(root: int, procs: dict[int, tuple[int, bytes]]) -> set[int]:
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (pp, _) in procs.items() if pp == parent and p not in found]
        found.update(children)
        frontier += children
    return found


def _has_env(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _is_shim(argv: bytes) -> bool:
    args = argv.split(b"\0")
    return b"katapy.shim.main" in args or args[0].endswith(b"containerd-shim-katapy-v2")


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False).stdout
