"""What the fault tests share: a runtime configuration per fault, the sandbox's VMM pid, a test-only QMP
monitor on the shim's QEMU, and the leftovers check for the ``kf-`` containers.

The test QMP monitor: QEMU serves one client per QMP socket, and the shim holds its own, so the
configuration's ``[hypervisor] path`` points at a wrapper that execs the real QEMU with a second ``-qmp``
socket, ``<sandbox state>/vm/fault-qmp.sock``.  The wrapper execs, so QEMU keeps the pid the shim
recorded and dies with the sandbox like any other.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from katapy import config as config_mod
from tests.shim.containerd import PrivateContainerd, leftovers

RUNTIME = "io.containerd.katapy.v2"
IMAGE = "docker.io/katapy/busybox:latest"
BOOT_TIMEOUT = 300
PREFIX = "kf-"
FAULT_QMP = "fault-qmp.sock"

WRAPPER = """#!/bin/sh
# the shim's QEMU with a second QMP monitor for the fault tests (tests/faults/helpers.py)
for a in "$@"; do case "$a" in unix:*/qmp.sock,*) d=${{a#unix:}}; d=${{d%/qmp.sock,*}};; esac; done
exec {qemu} "$@" -qmp unix:$d/{sock},server=on,wait=off
"""


def qemu_backend() -> bool:
    """Whether the default configuration runs sandboxes under QEMU (the faults that need its QMP)."""
    from katapy import hypervisor

    return hypervisor.select(config_mod.load()).name == "qemu"


def write_config(path: Path, *, kernel_params: str = "", dial_timeout: float = 60.0,
                 request_timeout: float = 60.0, test_qmp: bool = False) -> Path:
    """A runtime configuration file (``ctr run --runtime-config-path``) for one fault."""
    lines = ["[hypervisor]"]
    if kernel_params:
        lines.append(f'kernel_params = "{kernel_params}"')
    if test_qmp:
        wrapper = path.with_suffix(".qemu.sh")
        wrapper.write_text(WRAPPER.format(qemu=config_mod.load().hypervisor.path, sock=FAULT_QMP))
        wrapper.chmod(0o755)
        lines.append(f'path = "{wrapper}"')
    lines += ["[agent]", f"dial_timeout = {dial_timeout!r}", f"request_timeout = {request_timeout!r}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def vm_dir(c: PrivateContainerd, cid: str) -> Path:
    return c.katapy_state / cid / "vm"


def vmm_pid(c: PrivateContainerd, cid: str, timeout: float = BOOT_TIMEOUT) -> int:
    """QEMU's pid, from its pid file, as soon as it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int((vm_dir(c, cid) / "qemu.pid").read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"no QEMU started for {cid} within {timeout} s")


def recorded_vmm_pid(c: PrivateContainerd, cid: str) -> int:
    return int(json.loads((c.katapy_state / cid / "sandbox.json").read_text())["vmm_pid"])


def wait_console(c: PrivateContainerd, cid: str, text: str, until: Callable[[], object] = lambda: None,
                 timeout: float = BOOT_TIMEOUT) -> None:
    """Wait until the VM's console shows ``text`` (AssertionError once ``until()`` is not None)."""
    console = vm_dir(c, cid) / "console.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and until() is None:
        try:
            if text in console.read_text(errors="replace"):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{cid}'s console never showed {text!r}")


def console_tail(c: PrivateContainerd, cid: str, n: int = 2000) -> str:
    """The end of ``cid``'s VM console, for a failure message ("" once the sandbox is gone)."""
    try:
        return "\n--- console ---\n" + (vm_dir(c, cid) / "console.log").read_text(errors="replace")[-n:]
    except OSError:
        return ""


def qmp(c: PrivateContainerd, cid: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One command on the test QMP monitor (``write_config(test_qmp=True)``)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(vm_dir(c, cid) / FAULT_QMP))
        f = s.makefile("rwb")

        def ask(msg: dict[str, Any]) -> Any:
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
            assert "return" in reply, reply
            return reply["return"]

        assert "QMP" in json.loads(f.readline())
        ask({"execute": "qmp_capabilities"})
        return ask({"execute": command, **({"arguments": arguments} if arguments else {})})


def resume_and_kill(pid: int) -> None:
    """Make sure a QEMU a test stopped is gone, whatever the test's outcome (SIGKILL ends a stopped process)."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def shim_log_since(c: PrivateContainerd, start: int) -> str:
    with open(c.log_path, errors="replace") as f:
        f.seek(start)
        return f.read()


def nothing_left(c: PrivateContainerd, *ids: str) -> list[str]:
    """``leftovers`` for the fault tests' ``kf-`` containers, plus containerd's own records of them."""
    found = leftovers(c, PREFIX, ids)
    listed = c.ctr("containers", "ls", "-q").stdout.split()
    found += [f"container {cid}" for cid in ids if cid in listed]
    return found


def remove(c: PrivateContainerd, cid: str) -> None:
    c.ctr("task", "delete", "-f", cid, check=False, timeout=60)
    c.ctr("containers", "rm", cid, check=False, timeout=30)
