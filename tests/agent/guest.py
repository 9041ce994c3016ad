"""The agent as PID 1 of a booted guest, as an :class:`AgentTarget` for the agent tests.

One sandbox VM (katapy.testing.sandbox) serves a whole test module: booting
takes seconds under TCG.  Each test gets its own ttrpc connection over the
sandbox's hybrid vsock socket; container root filesystems are written into
the sandbox's shared directory on the host and reach the guest through the
virtio-fs share, which every test's CreateSandbox mounts at
``/run/katapy/shared`` (the Storage the shim sends, docs/agent.md).  After a
test, DestroySandbox removes whatever it left so the next one starts clean.
"""
from __future__ import annotations

import dataclasses
import shutil
import socket
from pathlib import Path

import trio

from katapy import config as kconfig
from katapy.agent_client import AgentClient
from katapy.agent_client.types import Storage
from katapy.testing.sandbox import SandboxThread, missing_requirements

from .helpers import AgentTarget, make_busybox_rootfs

SHARE_TAG = "katapy-shared"
GUEST_SHARED = "/run/katapy/shared"
SHARE_STORAGE = Storage(driver="virtio-fs", source=SHARE_TAG, fstype="virtiofs", mount_point=GUEST_SHARED,
                        options=[])
HANDSHAKE_TIMEOUT_S = 10.0
BOOT_WAIT_S = 240.0


def guest_config(backend: str) -> tuple[kconfig.KatapyConfig | None, str | None]:
    """The configuration to boot ``backend`` with, or why it cannot start here."""
    cfg = kconfig.load(check_files=False)
    cfg = dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, name=backend,
                                                                  shared_fs="virtio-fs"),
                              # emulated (TCG) and nested (harness) guests on a busy host boot slowly
                              agent=dataclasses.replace(cfg.agent, dial_timeout=max(cfg.agent.dial_timeout,
                                                                                    BOOT_WAIT_S)))
    reason = missing_requirements(cfg, backend)
    if reason:
        return None, f"cannot start a {backend} sandbox VM: {reason}"
    if not Path("/bin/busybox").exists():
        return None, "/bin/busybox (busybox-static) is not installed: no container rootfs to share"
    return cfg, None


def dial_hybrid_vsock(uds: Path, port: int) -> socket.socket:
    """A blocking stream to guest vsock ``port``: ``CONNECT <port>\\n``, then ``OK <hostport>\\n``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        sock.connect(str(uds))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            byte = sock.recv(1)
            if not byte:
                break
            line += byte
        if not line.startswith(b"OK "):
            raise ConnectionError(f"hybrid vsock {uds}: CONNECT {port} answered {line!r}")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


class GuestAgent:
    """A booted sandbox VM whose agent the tests of one module share."""

    def __init__(self, cfg: kconfig.KatapyConfig, backend: str) -> None:
        self.backend = backend
        self.port = cfg.agent.port
        self.vm = SandboxThread(config=cfg, backend=backend)
        sandbox = self.vm.sandbox
        assert sandbox is not None
        self.shared_dir = sandbox.shared_dir
        self.uds = sandbox.hypervisor.agent_socket()
        self.boot_times = dict(sandbox.times)
        self._made: list[Path] = []

    def target(self) -> AgentTarget:
        def rootfs(cid: str) -> str:
            host = self.shared_dir / cid
            if not host.exists():
                make_busybox_rootfs(host / "rootfs")
                self._made.append(host)
            return f"{GUEST_SHARED}/{cid}/rootfs"

        async def connect() -> AgentClient:
            return await AgentClient.connect(self.uds, port=self.port, timeout=30)

        return AgentTarget(
            connect, rootfs, f"agent as PID 1 in a {self.backend} guest ({self.uds})",
            raw_connect=lambda: dial_hybrid_vsock(self.uds, self.port),
            alive=self.vm.alive,
            scratch="/run/katapy/scratch",
            resolv_conf="/etc/resolv.conf",
            in_guest=True,
            storages=[SHARE_STORAGE],
        )

    def reset(self) -> None:
        """DestroySandbox (removes every container, unmounts the sandbox storages) and drop the rootfs copies."""
        async def destroy() -> None:
            with trio.fail_after(60):
                async with await AgentClient.connect(self.uds, port=self.port, timeout=30) as agent:
                    await agent.destroy_sandbox()

        try:
            if self.vm.alive():
                trio.run(destroy)
        finally:
            while self._made:
                shutil.rmtree(self._made.pop(), ignore_errors=True)

    def console(self) -> str:
        sandbox = self.vm.sandbox
        return sandbox.hypervisor.console_log() if sandbox is not None else ""  # type: ignore[attr-defined]

    def close(self) -> None:
        self.vm.close()
