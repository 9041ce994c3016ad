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
import subprocess
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
        _ensure_fd3(sock)
        with open(os.devnull, "r+b") as devnull:
            proc = subprocess.Popen(
                daemon_command(args, path), cwd=bundle, stdin=devnull, stdout=devnull, stderr=devnull,
                pass_fds=(LISTENER_FD,), start_new_session=True, close_fds=True,
            )
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    sock.close()
    addr.write_address(bundle, address)
    addr.write_pid(bundle, proc.pid)
    sys.stdout.write(address)
    return 0



def _ensure_fd3(sock: socket.socket) -> None:
    """Put the listener at fd 3 (Go's ExtraFiles[0]) so the daemon finds it there."""
    if sock.fileno() == LISTENER_FD:
        return
    try:
        os.fstat(LISTENER_FD)
    except OSError:
        os.dup2(sock.fileno(), LISTENER_FD, inheritable=False)
        return
    raise RuntimeError(f"fd {LISTENER_FD} is already in use; cannot hand the listener to the daemon")
