"""virtio-net with a real Linux guest on this host: katapy's NetDevice served to QEMU/TCG over vhost-user.

QEMU fronts the device (``-netdev vhost-user`` + ``virtio-net-device``); the
frames go through katapy's back end to a tap in a network namespace made by
the test (10.79.0.1/24).  The guest (the virtio tests' busybox initramfs,
driven over hybrid vsock) pings the tap's host end and sends 1 MiB over TCP,
compared by SHA-256.  The built-in VMM variant is test_net_guest.py (kvm).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from katapy.testing.initramfs import busybox_initramfs

from .conftest import BOOT_TIMEOUT_S, GUEST_CID, INIT, TOOL_PORT, Guest, _build_tool, _kernel
from .netns_tap import TcpSink, make_tap

pytestmark = pytest.mark.guest

TAP, GUEST_MAC = "ktapv0", "02:00:00:00:79:02"
HOST_IP, GUEST_IP = "10.79.0.1", "10.79.0.2"
PAYLOAD = 1 << 20


@pytest.fixture(scope="module")
def net_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Guest, str]]:
    kernel, mods, where = _kernel()
    if kernel is None or mods:
        pytest.skip(f"needs katapy's guest kernel (virtio-net built in): {where}")
    if shutil.which("qemu-system-x86_64") is None or shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root, qemu-system-x86_64 and iproute2")
    from katapy.resource.network.netns import run_in_netns
    from katapy.resource.network.tap import open_queue
    from katapy.vmm.virtio.net import NetDevice
    from katapy.vmm.virtio.vhost_user import VhostUserServer
    from katapy.vmm.virtio.vsock import VsockDevice

    ns = f"katapy-vnet-{uuid.uuid4().hex[:8]}"
    work = tmp_path_factory.mktemp("netvm")
    g = Guest(work, work / "vsock.sock", work, work / "console.log", None)  # type: ignore[arg-type]
    try:
        make_tap(ns, TAP, HOST_IP)
        net = NetDevice(TAP, GUEST_MAC, tap_fd=run_in_netns(f"/var/run/netns/{ns}", open_queue, TAP))
        g.servers = [VhostUserServer(VsockDevice(GUEST_CID, g.vsock_uds), work / "vu-vsock.sock"),
                     VhostUserServer(net, work / "vu-net.sock")]
        for s in g.servers:
            s.start()
        initrd = busybox_initramfs(work / "initrd.gz", INIT.format(insmods="", port=TOOL_PORT),
                                   {"/bin/vsocktool": _build_tool(work)})
        cmd = [
            "qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off,rtc=off", "-accel", "tcg",
            "-cpu", "max", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", f"file:{g.console}", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 reboot=t panic=-1 loglevel=4", "-no-reboot",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem",
            "-chardev", f"socket,id=vs,path={work / 'vu-vsock.sock'}", "-device", "vhost-user-vsock-device,chardev=vs",
            "-chardev", f"socket,id=nc,path={work / 'vu-net.sock'}", "-netdev", "vhost-user,id=n0,chardev=nc",
            "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}",
        ]
        g.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(work / "qemu.out", "wb"),
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while f"listening on {TOOL_PORT}" not in (g.console_text() if g.console.exists() else ""):
            if g.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"guest did not come up (QEMU {g.proc.poll()}): "
                                   f"{(work / 'qemu.out').read_text()}\n{g.console_text()[-3000:]}")
            time.sleep(0.2)
        yield g, ns
    finally:
        g.stop()
        for s in g.servers:
            s.device.close()
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def test_guest_pings_and_streams_tcp_through_katapy_virtio_net(net_guest: tuple[Guest, str]) -> None:
    g, ns = net_guest
    out = g.sh(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && ip link show eth0 && "
               f"ping -c 3 -W 5 {HOST_IP}")
    assert GUEST_MAC in out, out
    assert "3 packets transmitted, 3 packets received" in out, out

    sink = TcpSink(ns, HOST_IP, 8000)
    try:
        out = g.sh(f"head -c {PAYLOAD} /dev/urandom > /tmp/p && nc {HOST_IP} 8000 < /tmp/p && sha256sum /tmp/p",
                   timeout=120)
    finally:
        received = sink.close()
    assert len(received) == PAYLOAD, out
    assert hashlib.sha256(received).hexdigest() in out
