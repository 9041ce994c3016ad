"""``containerd-shim-katapy-v2 ... start``: return the address of the shim serving this container.

A CRI pod member (``container-type=container``) gets its sandbox's address
and no new process (Kata ``getAddress``).  Otherwise: if a shim already
listens at the group's address, reuse it (runc v2 manager); else bind the
socket (0600 in /run/containerd/s), spawn the daemon detached (new session,
stdio on /dev/null so containerd's CombinedOutput returns, listener as fd 3),
write ``address`` and ``shim.pid``, and print only the address.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from katapy.shim import address as addr
from katapy.shim import bundle as bundle_mod
from katapy.shim.args import ShimArgs

LISTENER_FD = 3


def _listening(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _listen(path: Path) -> socket.socket:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def daemon_command(args: ShimArgs, sock_path: Path) -> list[str]:
    cmd = [sys.executable, "-m", "katapy.shim.main", "-namespace", args.namespace, "-address", args.address,
           "-publish-binary", args.publish_binary, "-id", args.id, "-socket", os.fspath(sock_path)]
    if args.debug:
        cmd.append("-debug")
    return cmd


def run(args: ShimArgs) -> int:
    bundle = Path(args.bundle or os.getcwd())
    if not sys.stdin.isatty():
        sys.stdin.buffer.read()  # runtime options Any: Create carries them again
    spec = bundle_mod.load_spec(bundle)
    group = bundle_mod.sandbox_id(spec, args.id)
    address = addr.socket_address(args.address, args.namespace, group)
    path = addr.socket_path(address)
    if bundle_mod.is_pod_member(spec) or _listening(path):
        addr.write_address(bundle, address)
        sys.stdout.write(address)
        return 0
    sock = _listen(path)
    try:
        pid = _spawn_daemon(daemon_command(args, path), bundle, sock.fileno())
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    sock.close()
    addr.write_address(bundle, address)
    addr.write_pid(bundle, pid)
    sys.stdout.write(address)
    return 0




def _spawn_daemon(cmd: list[str], bundle: Path, listener_fd: int) -> int:
    """posix_spawn the daemon in a new session: listener at fd 3 (Go's ExtraFiles[0]), stdio on /dev/null.

    Every other descriptor of this process is close-on-exec (Python's default),
    so the daemon inherits neither containerd's output pipes nor anything else.
    """
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
        actions.append((os.POSIX_SPAWN_DUP2, listener_fd, LISTENER_FD))
        os.chdir(bundle)  # the daemon opens the bundle's log FIFO relative to its cwd
        return os.posix_spawn(cmd[0], cmd, dict(os.environ), file_actions=actions, setsid=True)
    finally:
        os.close(devnull)
