"""A private containerd 1.6 for the shim tests: own config, root, state, grpc and ttrpc addresses.

The shim is put on containerd's PATH as a wrapper that runs this checkout's
``katapy.shim.main`` with the venv's Python; katapy's state goes under the
test directory (KATAPY_STATE), so nothing is shared with a system install.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE = "docker.io/katapy/busybox:latest"  # what private_containerd imports
CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[debug]
  level = "{level}"
"""


class PrivateContainerd:
    def __init__(self, base: Path, extra_env: dict[str, str] | None = None, level: str = "info") -> None:
        self.base = base
        self.root = base / "root"
        self.state = base / "state"
        self.address = str(base / "c.sock")
        self.bin = base / "bin"
        self.katapy_state = base / "katapy"
        self.log_path = base / "containerd.log"
        self.extra_env = extra_env or {}
        self.level = level
        self.proc: subprocess.Popen[bytes] | None = None
        self.namespace = "katapytest"

    @property
    def ttrpc_address(self) -> str:
        return self.address + ".ttrpc"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        env["PYTHONPATH"] = str(REPO / "src")
        env["KATAPY_STATE"] = str(self.katapy_state)
        env.update(self.extra_env)
        return env

    def install_shim(self) -> None:
        self.bin.mkdir(parents=True, exist_ok=True)
        wrapper = self.bin / "containerd-shim-katapy-v2"
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO / 'src'} exec {sys.executable} -m katapy.shim.main \"$@\"\n")
        wrapper.chmod(0o755)

    def start(self) -> None:
        self.install_shim()
        for d in (self.root, self.state, self.katapy_state):
            d.mkdir(parents=True, exist_ok=True)
        cfg = self.base / "config.toml"
        cfg.write_text(CONFIG.format(root=self.root, state=self.state, address=self.address, level=self.level))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=log, stderr=log,
                                     env=self.env(), start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log_path.read_text()[-2000:]}")
            if self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("containerd did not answer within 30 s")

    def ctr(self, *args: str, check: bool = True, timeout: float = 120, input: bytes | None = b"",
            namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["ctr", "--address", self.address, "--namespace", namespace or self.namespace, *args]
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, env=self.env(), input=input)
        out = subprocess.CompletedProcess(cmd, res.returncode, res.stdout.decode(errors="replace"),
                                          res.stderr.decode(errors="replace"))
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {out.stdout}{out.stderr}")
        return out

    def import_image(self, tar: Path) -> None:
        self.ctr("images", "import", str(tar))

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill_shims(self) -> None:
        """SIGKILL katapy shim daemons started by this containerd (found by their KATAPY_STATE)."""
        for pid in shim_pids(self.katapy_state):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def unmount_all(self) -> None:
        """Detach whatever containerd left mounted under the test directory."""
        points = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                p = line.split()[4]
                if p.startswith(str(self.base)):
                    points.append(p)
        for p in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", p], check=False)

    def remove_containers(self) -> None:
        """``ctr task delete -f`` + ``containers rm`` for whatever a failed test left, so the shims stop
        their VMs and release cgroups/mounts themselves (a SIGKILLed shim leaves that to ``delete``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            for cid in self.ctr("containers", "ls", "-q", check=False, timeout=30).stdout.split():
                self.ctr("task", "delete", "-f", cid, check=False, timeout=60)
                self.ctr("containers", "rm", cid, check=False, timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def cleanup(self) -> None:
        self.remove_containers()
        self.kill_shims()
        self.stop()
        self.unmount_all()
        shutil.rmtree(self.base, ignore_errors=True)


def shims_left(katapy_state: Path, settle_s: float = 15.0) -> list[int]:
    """Shim pids still alive after giving them ``settle_s`` to exit: containerd does not wait for a shim
    process to end after Shutdown, so ``ctr`` can return while the shim is still exiting."""
    deadline = time.monotonic() + settle_s
    while (pids := shim_pids(katapy_state)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def shim_pids(katapy_state: Path) -> list[int]:
    """Pids of katapy shim processes whose environment names ``katapy_state``."""
    found = []
    marker = f"KATAPY_STATE={katapy_state}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"katapy.shim.main" not in cmdline:
                continue
            if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
        except OSError:
            continue
    return found


@contextlib.contextmanager
def private_containerd(extra_env: dict[str, str] | None = None) -> Iterator[PrivateContainerd]:
    """A started PrivateContainerd with the busybox image imported; everything it ran is stopped after."""
    from katapy.testing.busybox_image import build

    base = Path(tempfile.mkdtemp(prefix="katapy-ctrd-", dir="/tmp"))
    c = PrivateContainerd(base, extra_env)
    try:
        c.start()
        c.import_image(build(base / "busybox.tar", IMAGE))
        yield c
    finally:
        c.cleanup()


def leftovers(c: PrivateContainerd, prefix: str, ids: Iterable[str] = (), settle_s: float = 15.0) -> list[str]:
    """What the runs of containers ``ids`` (all named ``prefix``...) left behind, after giving shims
    ``settle_s`` to exit: katapy state entries, shim, QEMU and virtiofsd processes, mounts, shim sockets,
    sandbox cgroups (``katapy/<prefix>*`` in every hierarchy), netns and host links named by an id."""
    ids = tuple(ids)
    shims_left(c.katapy_state, settle_s)
    found = []
    if c.katapy_state.exists():
        found += [f"state {p}" for p in c.katapy_state.iterdir()]
    found += [f"shim pid {p}" for p in shim_pids(c.katapy_state)]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if str(c.katapy_state) in line]
    sockets = {hashlib.sha256(f"{c.address}/{c.namespace}/{cid}".encode()).hexdigest() for cid in ids}
    found += [f"socket {p}" for p in Path("/run/containerd/s").glob("*") if p.name in sockets]
    cgroups = Path("/sys/fs/cgroup")
    found += [f"cgroup {p}" for p in [*cgroups.glob(f"katapy/{prefix}*"), *cgroups.glob(f"*/katapy/{prefix}*")]
              if _ours(c, p)]
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found += [f"process {line}" for line in out.splitlines()
              if ("qemu-system" in line or "virtiofsd" in line) and str(c.katapy_state) in line]
    named = [*Path("/run/netns").glob("*"), *Path("/sys/class/net").glob("*")]
    found += [f"netns or link {p}" for p in named for cid in ids if cid in p.name]
    return found


def _ours(c: PrivateContainerd, cgroup: Path) -> bool:
    """A sandbox cgroup of this containerd: empty (leaked), or holding a process started with its KATAPY_STATE
    (cgroup names are host-wide, and another run of the same tests may be using the same container ids)."""
    marker = f"KATAPY_STATE={c.katapy_state}".encode()
    try:
        pids = (cgroup / "cgroup.procs").read_text().split()
    except OSError:
        return False
    for pid in pids:
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return True
        except OSError:
            continue
    return not pids


def require_guest() -> None:
    from katapy import paths

    if not paths.guest_initramfs().exists():
        pytest.skip(f"guest image {paths.guest_initramfs()} is not built yet (make image)")
    from katapy import config as config_mod

    try:
        cfg = config_mod.load()
    except config_mod.ConfigError as exc:
        pytest.skip(f"no usable katapy configuration for a VM: {exc}")
    try:
        from katapy import hypervisor

        hypervisor.select(cfg)
    except Exception as exc:  # a backend module not landed yet
        pytest.skip(f"hypervisor backend unavailable: {exc}")


def wait_status(c: PrivateContainerd, cid: str, status: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in c.ctr("task", "ls", check=False).stdout.splitlines():
            if line.split()[:1] == [cid] and status in line:
                return True
        time.sleep(0.5)
    return False

