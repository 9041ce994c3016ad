"""End to end through containerd: ``ctr run --runtime io.containerd.katapy.v2`` runs containers in a VM.

These need a bootable guest (katapy.paths kernel + initramfs, the lead's
builds) and a hypervisor backend; they skip, saying which is missing, until
both exist.  Under TCG a boot takes several seconds, so the module shares
one containerd and keeps the number of VMs modest.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .containerd import PrivateContainerd, leftovers, shim_pids, wait_status
from .containerd import require_guest as _require_guest

pytestmark = [pytest.mark.containerd, pytest.mark.guest, pytest.mark.slow]
RUNTIME = "io.containerd.katapy.v2"
IMAGE = "docker.io/katapy/busybox:latest"
BOOT_TIMEOUT = 300


@pytest.fixture(autouse=True)
def _guest_needed() -> None:
    _require_guest()


@pytest.fixture(autouse=True)
def _containerd_log_on_failure(containerd: PrivateContainerd) -> Iterator[None]:
    """Print what containerd and the shims logged during the test (shown by pytest only when it fails)."""
    start = containerd.log_path.stat().st_size if containerd.log_path.exists() else 0
    yield
    with open(containerd.log_path, errors="replace") as f:
        f.seek(start)
        lines = [ln for ln in f if "level=debug" not in ln and "level='debug'" not in ln]
    print("".join(lines[-300:]))


def run(c: PrivateContainerd, cid: str, *cmd: str, extra: tuple[str, ...] = (), check: bool = False,
        input: bytes | None = b"") -> subprocess.CompletedProcess[str]:
    return c.ctr("run", "--rm", "--runtime", RUNTIME, *extra, IMAGE, cid, *cmd, check=check, timeout=BOOT_TIMEOUT,
                 input=input)


KR_IDS = ("kr-out", "kr-exit3", "kr-exit137", "kr-env", "kr-bind", "kr-d", "kr-k9", "kr-restart", "kr-priv", "kr-bmetrics")


def _leftovers(c: PrivateContainerd, settle_s: float = 15.0) -> list[str]:
    """What this module's runs left behind (``containerd.leftovers`` for its ``kr-`` containers)."""
    return leftovers(c, "kr-", KR_IDS, settle_s)


def test_run_prints_guest_kernel_output(containerd: PrivateContainerd) -> None:
    # release and build: inside the nested harness the host (L1) runs a 6.1 kernel of the same release
    res = run(containerd, "kr-out", "sh", "-c", "uname -r -v; date +%s", check=True)
    kernel, guest_time = res.stdout.strip().rsplit("\n", 1)
    host = f"{os.uname().release} {os.uname().version}"
    assert kernel.strip() and kernel.strip() != host, f"guest said {res.stdout!r}, host is {host}"
    # the guest's wall clock is the host's (CMOS RTC under QEMU, kvmclock on KVM): not 1970
    assert abs(int(guest_time) - time.time()) < 300, f"guest clock {guest_time}, host {time.time():.0f}"
    assert not _leftovers(containerd)
    # the agent's own log lines (vsock log port) were forwarded into the shim's log, so containerd's
    forwarded = [ln for ln in containerd.log_path.read_text(errors="replace").splitlines()
                 if "agent log" in ln and "sandbox created" in ln and "kr-out" in ln]
    assert forwarded, "the agent's 'sandbox created' line never reached containerd's log"


def test_privileged_container_runs_with_the_guests_devices_not_the_hosts(containerd: PrivateContainerd) -> None:
    """``ctr run --privileged`` puts every host device in the spec (containerd's WithHostDevices); with
    ``[runtime] privileged_without_host_devices`` (the default, as Kata asks of containerd) the container
    runs with all capabilities and the VM's own devices, and no host disk is hot-plugged into its VM."""
    c = containerd
    mark = c.log_path.stat().st_size
    res = run(c, "kr-priv", "grep", "CapEff", "/proc/self/status", extra=("--privileged",))
    assert res.returncode == 0, res.stderr
    # containerd's WithAllCurrentCapabilities: every capability ctr has (this host's root lacks CAP_SYS_RESOURCE)
    with open("/proc/self/status") as f:
        host_caps = next(ln.strip() for ln in f if ln.startswith("CapEff"))
    assert res.stdout.strip() == host_caps, (res.stdout, host_caps)
    with open(c.log_path, errors="replace") as f:
        f.seek(mark)
        log = f.read()
    assert "host block devices withheld" in log and "block device attached" not in log
    assert not _leftovers(c)


@pytest.mark.parametrize("code", [0, 3])
def test_exit_codes_propagate(containerd: PrivateContainerd, code: int) -> None:
    res = run(containerd, f"kr-exit{code}", "sh", "-c", f"exit {code}")
    assert res.returncode == code, res.stderr


def _why_not_stopped(c: PrivateContainerd, cid: str) -> str:
    """What ``ctr task ls`` says and the shim's own lines about ``cid`` (the log is long: only its end)."""
    ls = c.ctr("task", "ls", check=False)
    shim = [ln for ln in c.log_path.read_text(errors="replace").splitlines()
            if f"'{cid}'" in ln and ("shim" in ln or "agent" in ln)]
    return (f"ctr task ls ({ls.returncode}): {ls.stdout}{ls.stderr}\n--- the shim's last lines ---\n"
            + "\n".join(shim[-30:]))


def test_sigkill_from_outside_exits_137(containerd: PrivateContainerd) -> None:
    """SIGKILL of the container's init gives 128+9.  (From inside, ``kill -9 $$`` by PID 1 is ignored by
    the kernel, with runc as well, so the signal comes from ``ctr task kill``.)"""
    c = containerd
    cmd = ["ctr", "--address", c.address, "--namespace", c.namespace, "run", "--rm", "--runtime", RUNTIME, IMAGE,
           "kr-exit137", "sleep", "600"]
    proc = subprocess.Popen(cmd, env=c.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert wait_status(c, "kr-exit137", "RUNNING", BOOT_TIMEOUT), "container never ran"
        c.ctr("task", "kill", "-s", "SIGKILL", "kr-exit137")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 137, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        c.ctr("task", "delete", "-f", "kr-exit137", check=False)
        c.ctr("containers", "rm", "kr-exit137", check=False)
    assert not _leftovers(c)


USER_IMAGE = "docker.io/katapy/busybox-nobody:latest"


def test_env_cwd_user(containerd: PrivateContainerd, tmp_path: Path) -> None:
    """--env and --cwd reach the guest process; the user comes from the image config's User (ctr 1.6
    has no --user flag), as for an image built with ``USER 65534``."""
    from katapy.testing.busybox_image import build

    containerd.import_image(build(tmp_path / "nobody.tar", USER_IMAGE, user="65534"))
    res = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--env", "FOO=bar", "--cwd", "/tmp", USER_IMAGE,
                         "kr-env", "sh", "-c", 'echo "$FOO $(pwd) $(id -u)"', timeout=BOOT_TIMEOUT, check=True)
    assert res.stdout.strip() == "bar /tmp 65534"


def test_bind_mount_read_and_written(containerd: PrivateContainerd, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("from-host\n")
    res = run(containerd, "kr-bind", "sh", "-c", "cat /data/in.txt && echo from-guest > /data/out.txt",
              extra=("--mount", f"type=bind,src={tmp_path},dst=/data,options=rbind:rw"), check=True)
    assert res.stdout.strip() == "from-host"
    assert (tmp_path / "out.txt").read_text() == "from-guest\n"


def test_detached_exec_ps_pause_metrics_kill_delete(containerd: PrivateContainerd) -> None:
    c = containerd
    # PID 1 ignores signals it has no handler for, so the init traps SIGTERM
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "kr-d", "sh", "-c", "trap 'exit 7' TERM; while :; do sleep 1; done",
          timeout=BOOT_TIMEOUT)
    try:
        res = c.ctr("task", "exec", "--exec-id", "e1", "kr-d", "sh", "-c", "echo exec-ok; exit 5", check=False)
        assert res.stdout.strip() == "exec-ok" and res.returncode == 5
        assert "kr-d" in c.ctr("task", "ls").stdout
        # the container's processes in the guest by guest pid (the init's sh and its sleep), not the VMM's pid
        vmm_pid = json.loads((c.katapy_state / "kr-d" / "sandbox.json").read_text())["vmm_pid"]
        deadline = time.monotonic() + 30
        while True:
            rows = [ln.split() for ln in c.ctr("task", "ps", "kr-d").stdout.splitlines()[1:] if ln.strip()]
            if len(rows) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        pids = [int(r[0]) for r in rows]
        assert len(pids) >= 2 and vmm_pid not in pids and pids == sorted(pids), rows
        c.ctr("task", "pause", "kr-d")
        assert "PAUSED" in c.ctr("task", "ls").stdout
        c.ctr("task", "resume", "kr-d")
        assert "RUNNING" in c.ctr("task", "ls").stdout
        metrics = c.ctr("task", "metrics", "kr-d").stdout
        assert "memory" in metrics.lower()
        c.ctr("task", "kill", "-s", "SIGTERM", "kr-d")
        assert wait_status(c, "kr-d", "STOPPED", 60)
        deleted = c.ctr("task", "delete", "kr-d")
        assert "exit code 7" in deleted.stderr, deleted  # ctr warns of the trap's non-zero status
    finally:
        c.ctr("task", "delete", "-f", "kr-d", check=False)
        c.ctr("containers", "rm", "kr-d", check=False)
    assert not _leftovers(c)


def test_tty(containerd: PrivateContainerd) -> None:
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("ctr", ["ctr", "--address", containerd.address, "--namespace", containerd.namespace, "run",
                           "--rm", "-t", "--runtime", RUNTIME, IMAGE, "kr-tty", "sh", "-c", "tty; echo tty-ok"],
                   containerd.env())
    out = b""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert b"tty-ok" in out and b"/dev/pts/" in out, out
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.timeout(BOOT_TIMEOUT * 6)  # 20 VM boots: ~12 s each under TCG on an idle host, 30 s when loaded
def test_twenty_runs_leave_nothing_behind(containerd: PrivateContainerd) -> None:
    for i in range(20):
        res = run(containerd, f"kr-seq{i}", "true")
        assert res.returncode == 0, res.stderr
    assert not _leftovers(containerd)


def test_kill_9_of_the_shim_is_cleaned_by_containerd_delete(containerd: PrivateContainerd) -> None:
    c = containerd
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "kr-k9", "sleep", "600", timeout=BOOT_TIMEOUT)
    for pid in shim_pids(c.katapy_state):
        os.kill(pid, 9)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (c.katapy_state / "kr-k9").exists():
        time.sleep(0.5)
    c.ctr("task", "delete", "-f", "kr-k9", check=False)
    c.ctr("containers", "rm", "kr-k9", check=False)
    assert not (c.katapy_state / "kr-k9").exists()
    assert not _leftovers(c)


def test_containerd_restart_reconnects_to_the_running_shim(containerd: PrivateContainerd) -> None:
    """containerd restarted while a task runs finds the shim again through the bundle's ``address`` file."""
    c = containerd
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "kr-restart", "sleep", "600", timeout=BOOT_TIMEOUT)
    try:
        shims = shim_pids(c.katapy_state)
        assert shims
        c.stop()
        assert shim_pids(c.katapy_state) == shims, "the shim must outlive containerd"
        c.start()
        assert wait_status(c, "kr-restart", "RUNNING", 60)
        res = c.ctr("task", "exec", "--exec-id", "after", "kr-restart", "echo", "still-here")
        assert res.stdout.strip() == "still-here"
        c.ctr("task", "kill", "-s", "SIGKILL", "kr-restart")
        assert wait_status(c, "kr-restart", "STOPPED", 60), _why_not_stopped(c, "kr-restart")
    finally:
        c.ctr("task", "delete", "-f", "kr-restart", check=False)
        c.ctr("containers", "rm", "kr-restart", check=False)
    assert not _leftovers(c)
