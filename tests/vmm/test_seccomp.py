"""The built-in VMM's seccomp filters (katapy.vmm.seccomp) on real vCPU and event-loop threads.

Flat guests on /dev/kvm (kvm-pvm is enough).  A violation ends the whole
process, so those cases run in a child process (``_CHILD`` below) that boots a
flat guest with the one test seam, ``katapy.vmm.seccomp.installer.after_install``,
set to make a filtered thread call something off its list.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
import sys
import termios
import textwrap
import threading

import pytest

from katapy import config
from katapy.vmm import seccomp
from katapy.vmm.seccomp import bpf, filters
from katapy.vmm.seccomp._ffi import lib
from katapy.vmm.state import ExitReason
from tests.vmm.conftest import SerialCapture
from tests.vmm.guestasm import assemble

CLASSES = list(seccomp.ThreadClass)

# prints '?', spins on the UART's data-ready bit, echoes the byte + 1, then resets through the i8042
ECHO_GUEST = r"""
.code16
    mov $0x3f8, %dx
    mov $'?', %al
    out %al, %dx
    mov $0x3fd, %dx
1:  in %dx, %al
    test $1, %al
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    add $1, %al
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
"""


def _status_field(tid: int, key: str) -> str:
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {key} in /proc/self/task/{tid}/status")


def _seccomp_mode(tid: int, timeout: float = 5.0) -> str:
    """The thread's Seccomp field once it is 2, or as it is after ``timeout``: the device loop's thread loads
    its filter as it starts, which can be after the vCPU has already run the guest's first output."""
    import time

    deadline = time.monotonic() + timeout
    while (mode := _status_field(tid, "Seccomp")) != "2" and time.monotonic() < deadline:
        time.sleep(0.01)
    return mode


def _comm(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/comm") as f:
        return f.read().strip()


def _run_echo_guest(vmm) -> tuple[int, int, SerialCapture]:
    """Boot ECHO_GUEST and return (vCPU tid, device loop tid, serial) while it spins waiting for input."""
    out = SerialCapture()
    vmm.configure_machine(1, 16)
    vmm.set_flat_boot(assemble(ECHO_GUEST))
    vmm.add_serial_output(out)
    vmm.start()
    assert out.wait_for(b"?")
    vcpu_tid = vmm._vcpus[0]._thread.native_id
    loop_tid = vmm._built.loop._thread.native_id
    return vcpu_tid, loop_tid, out


# -- the filters on real threads --------------------------------------------------------------------
def test_a_flat_guest_runs_to_completion_with_both_filters_on(vmm):
    assert seccomp.enabled()  # the default, [hypervisor] seccomp = true
    vcpu_tid, loop_tid, out = _run_echo_guest(vmm)
    # the guest is running (spinning on the UART): both VMM threads are filtered, this one is not
    assert _seccomp_mode(vcpu_tid) == "2"
    assert _seccomp_mode(loop_tid) == "2"
    assert _status_field(vcpu_tid, "NoNewPrivs") == "1"
    assert _comm(vcpu_tid) == "katapy-vcpu0" and _comm(loop_tid) == "katapy-devices"
    assert seccomp.thread_mode() == 0  # the caller's (pytest's main) thread keeps no filter
    assert _status_field(threading.get_native_id(), "NoNewPrivs") == "0"  # per thread, like the filter
    assert vmm.serial_input(b"a") == 1
    ex = vmm.wait(10)
    assert ex is not None and ex.reason is ExitReason.RESET, ex
    assert bytes(out.data) == b"?b"


def test_with_seccomp_off_no_filter_is_installed(vmm):
    seccomp.configure(False)
    try:
        vcpu_tid, loop_tid, _ = _run_echo_guest(vmm)
        assert _status_field(vcpu_tid, "Seccomp") == "0"
        assert _status_field(loop_tid, "Seccomp") == "0"
        assert _comm(vcpu_tid) == "katapy-vcpu0"  # the thread is still named, for ps and strace
        vmm.serial_input(b"a")
        assert vmm.wait(10).reason is ExitReason.RESET
    finally:
        seccomp.configure(True)


def test_the_configuration_key():
    assert config.HypervisorConfig().seccomp is True
    assert config.from_dict({"hypervisor": {"seccomp": False}}, check_files=False).hypervisor.seccomp is False
    with pytest.raises(config.ConfigError, match=r"\[hypervisor\] seccomp = 'no': expected true or false"):
        config.from_dict({"hypervisor": {"seccomp": "no"}}, check_files=False)


# -- a violation ends the process with a report -----------------------------------------------------
_CHILD = textwrap.dedent(r"""
    import fcntl, os, socket, sys, termios
    from katapy import log
    from katapy.vmm.seccomp import installer

    cls, action, log_path, code = sys.argv[1], sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
    # the shim's set-up (katapy.shim.main): katapy's log on a write-only fd
    log.configure("info", log.FifoStream(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)))

    def off_list(thread_class):
        if thread_class.value != cls:
            return
        if action == "getppid":
            os.getppid()
        elif action == "ioctl":
            fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8))  # an ioctl request not on the vCPU's list
        elif action == "socket":
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # socket(2), but not AF_UNIX
        elif action == "none":
            pass

    installer.after_install = off_list  # the test seam
    from katapy.vmm.api import Vmm

    vmm = Vmm()
    vmm.configure_machine(1, 16)
    vmm.set_flat_boot(code)
    vmm.start()
    ex = vmm.wait(20)
    vmm.stop()
    print("VM ended:", ex.reason.value if ex else None, flush=True)
""")


def _child(tmp_path, cls: str, action: str) -> tuple[subprocess.CompletedProcess, str]:
    log_path = tmp_path / "shim.log"
    log_path.write_text("")
    code = assemble(".code16\n    mov $0xfe, %al\n    out %al, $0x64\n")  # reset at once: a clean end
    p = subprocess.run([sys.executable, "-c", _CHILD, cls, action, str(log_path), code.hex()],
                       capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    return p, log_path.read_text()


def _violation(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "event='seccomp violation'" in ln]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize(("cls", "action", "syscall", "thread"), [
    ("vcpu", "getppid", "getppid", "katapy-vcpu0"),
    ("vcpu", "ioctl", "ioctl", "katapy-vcpu0"),
    ("devices", "socket", "socket", "katapy-devices"),
])
def test_an_off_list_syscall_ends_the_process_and_the_log_names_it(kvm_required, tmp_path, cls, action, syscall,
                                                                      thread):
    p, log_text = _child(tmp_path, cls, action)
    assert p.returncode == seccomp.EXIT_STATUS == 159, (p.returncode, p.stdout, p.stderr, log_text)
    assert "VM ended" not in p.stdout  # nothing after the violation ran
    line = _violation(log_text)
    assert f"syscall={bpf.syscall_nr(syscall)} " in line and f"syscall_name='{syscall}'" in line, line
    assert f"thread='{thread}'" in line and "level='error'" in line and "arch='x86_64'" in line, line
    assert f"exit_status={seccomp.EXIT_STATUS}" in line, line
    assert line.startswith("time='20") and line.split()[0].endswith("Z'"), line  # katapy's log format
    tid = int(line.rsplit("tid=", 1)[1])
    assert tid > 0


def test_the_same_child_without_a_violation_runs_its_guest_to_the_end(kvm_required, tmp_path):
    p, log_text = _child(tmp_path, "vcpu", "none")
    assert p.returncode == 0, (p.stdout, p.stderr, log_text)
    assert "VM ended: reset" in p.stdout
    assert "seccomp violation" not in log_text


# -- the programs -----------------------------------------------------------------------------------
def _libseccomp():
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        so = ctypes.CDLL(name)
    except OSError:
        return None
    so.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    so.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
    return so


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.value)
def test_every_listed_syscall_resolves_on_x86_64(cls):
    rules = filters.rules(cls, pid=os.getpid())
    names = [r.name for r in rules]
    assert len(names) == len(set(names)), "a syscall listed twice"
    table = bpf.syscall_table()
    assert table["read"] == 0 and table["write"] == 1 and table["getppid"] == 110  # the x86_64 table
    missing = [n for n in names if n not in table]
    assert not missing, f"not x86_64 syscalls: {missing}"
    so = _libseccomp()
    if so is not None:  # a second opinion: libseccomp's own x86_64 table
        for n in names:
            assert so.seccomp_syscall_resolve_name_arch(bpf.AUDIT_ARCH_X86_64, n.encode()) == table[n], n
    assert {"write", "exit_group"} <= set(names)  # what the trap handler needs to report and exit


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.value)
def test_the_program_refuses_other_arches_x32_and_unlisted_calls(cls):
    prog = seccomp.program(cls)
    nr = bpf.syscall_nr
    allow, trap = bpf.RET_ALLOW, bpf.RET_TRAP
    assert bpf.run(prog, nr("write")) == allow
    assert bpf.run(prog, nr("futex")) == allow
    assert bpf.run(prog, 4, arch=bpf.AUDIT_ARCH_I386) == trap  # i386 write (int 0x80)
    assert bpf.run(prog, nr("write"), arch=bpf.AUDIT_ARCH_I386) == trap
    assert bpf.run(prog, nr("write") | bpf.X32_SYSCALL_BIT) == trap  # x32 write
    assert bpf.run(prog, 0x40000000 + 512) == trap
    for name in ("execve", "execveat", "clone", "clone3", "fork", "vfork", "ptrace", "mount", "setuid",
                 "getppid", "kill", "bpf", "init_module", "process_vm_writev", "unshare", "setns"):
        assert bpf.run(prog, nr(name)) == trap, name
    assert bpf.run(prog, nr("tgkill"), (os.getpid(), 1, 34)) == allow
    assert bpf.run(prog, nr("tgkill"), (1, 1, 9)) == trap  # another process
    assert len(prog) < 4096


def test_argument_rules():
    vcpu = seccomp.program(seccomp.ThreadClass.VCPU)
    dev = seccomp.program(seccomp.ThreadClass.DEVICES)
    nr = bpf.syscall_nr
    allow, trap = bpf.RET_ALLOW, bpf.RET_TRAP
    assert bpf.run(vcpu, nr("ioctl"), (5, lib.KVM_RUN, 0)) == allow
    assert bpf.run(vcpu, nr("ioctl"), (5, termios.TIOCGWINSZ, 0)) == trap
    assert bpf.run(vcpu, nr("ioctl"), (5, lib.TUNSETVNETHDRSZ, 0)) == trap  # a device's, not a vCPU's
    assert bpf.run(dev, nr("ioctl"), (5, lib.KVM_RUN, 0)) == trap
    assert bpf.run(dev, nr("ioctl"), (5, lib.FIONBIO, 0)) == allow
    assert bpf.run(vcpu, nr("openat"), (-100, 0, os.O_RDONLY | os.O_CLOEXEC)) == allow
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_CREAT, os.O_RDONLY | os.O_TRUNC, os.O_APPEND):
        assert bpf.run(vcpu, nr("openat"), (-100, 0, flags)) == trap, flags
    assert bpf.run(dev, nr("openat"), (-100, 0, os.O_RDWR | os.O_CREAT | os.O_EXCL)) == allow  # virtio-fs
    assert bpf.run(dev, nr("socket"), (1, 1, 0)) == allow  # AF_UNIX
    assert bpf.run(dev, nr("socket"), (2, 1, 0)) == trap  # AF_INET
    assert bpf.run(vcpu, nr("socket"), (1, 1, 0)) == trap


def test_kernel_support_is_reported():
    assert seccomp.kernel_support() is None  # this host's kernel has seccomp filters with the trap action
    assert seccomp.thread_mode() == 0


def test_a_program_the_kernel_rejects_is_an_error_not_a_silent_no_op():
    from katapy.vmm.seccomp._ffi import ffi

    prog = ffi.new("struct sock_filter[]", 1)
    prog[0].code = bpf.LD_ABS  # a program must end in a return: the kernel's checker refuses this one
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(lib.katapy_seccomp_load(prog, 1)))
    t.start()
    t.join(5)
    assert out == [-errno.EINVAL]
    assert seccomp.thread_mode() == 0


def test_the_configuration_key_reaches_the_filters_and_qemus_sandbox(tmp_path):
    """``[hypervisor] seccomp`` as a user writes it: select() turns the VMM threads' filters and QEMU's
    -sandbox on or off."""
    import katapy.hypervisor as hypervisor
    from katapy.config import load

    try:
        for value in (False, True):
            cfg_file = tmp_path / "configuration.toml"
            cfg_file.write_text(f'[hypervisor]\nname = "qemu"\nseccomp = {str(value).lower()}\n')
            cfg = load(cfg_file, check_files=False)
            assert cfg.hypervisor.seccomp is value
            hv = hypervisor.select(cfg)
            assert seccomp.enabled() is value
            assert getattr(hv, "seccomp", value) is value
    finally:
        seccomp.configure(True)
