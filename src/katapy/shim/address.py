"""The shim's socket address and the bundle's ``address`` file (docs/protocols.md §1).

``unix:///run/containerd/s/<hex(sha256(join(<-address>, <ns>, <group id>)))>``
(containerd v1.6 ``runtime/v2/shim/util_unix.go`` SocketAddress); the address
is written without a newline to ``<bundle>/address`` through a temp file and
a rename, and the shim's pid to ``<bundle>/shim.pid``.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

SOCKET_DIR = Path("/run/containerd/s")
MAX_UNIX_PATH = 106


def socket_address(containerd_address: str, namespace: str, group_id: str, base: Path = SOCKET_DIR) -> str:
    digest = hashlib.sha256(posixpath.join(containerd_address, namespace, group_id).encode()).hexdigest()
    return f"unix://{base / digest}"


def socket_path(address: str) -> Path:
    if not address.startswith("unix://"):
        raise ValueError(f"not a unix:// address: {address!r}")
    path = address[len("unix://"):]
    if len(path) > MAX_UNIX_PATH:
        raise ValueError(f"socket path {path!r} is longer than {MAX_UNIX_PATH} bytes")
    return Path(path)


def write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_address(bundle: Path, address: str) -> None:
    write_atomic(bundle / "address", address)


def read_address(bundle: Path) -> str:
    return (bundle / "address").read_text().strip()


def write_pid(bundle: Path, pid: int) -> None:
    write_atomic(bundle / "shim.pid", str(pid))
