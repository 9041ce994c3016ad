"""virtio-net with a real Linux guest on katapy's built-in VMM (``kvm``: on a kvm-pvm host it runs in
the nested KVM harness).

The test makes a network namespace holding a tap (10.78.0.1/24), hands the
built-in VMM an fd attached to it (as katapy.resource.network does for a
pod), configures the guest NIC through the agent (UpdateInterface by MAC),
and from a container in the guest pings the host end of the tap and sends
a 1 MiB TCP stream to a listener in the namespace, compared by SHA-256.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import trio

from katapy import config as kconfig
from katapy import hypervisor
from katapy.agent_client.types import Interface, IPAddress
from katapy.hypervisor.base import NetDevice as NetDeviceSpec
from katapy.shim.agent_dial import dial_agent
from katapy.testing.sandbox import missing_requirements

from agent.helpers import make_busybox_rootfs, make_spec  # tests/ is on sys.path (rootdir-relative packages)

from .netns_tap import TcpSink, make_tap

pytestmark = [pytest.mark.kvm, pytest.mark.guest]

TAP, GUEST_MAC = "ktapg0", "02:00:00:00:78:02"
HOST_IP, GUEST_IP = "10.78.0.1", "10.78.0.2"
PAYLOAD = 1 << 20


def test_guest_pings_tap_host_and_streams_tcp() -> None:
    cfg = kconfig.load(check_files=False)
    cfg = dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, name="builtin",
                                                                  shared_fs="virtio-fs"))
    reason = missing_requirements(cfg, "builtin")
    if reason:
        pytest.skip(f"cannot start a builtin sandbox VM: {reason}")
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs iproute2 and /dev/net/tun")
    from katapy.resource.network.netns import run_in_netns
    from katapy.resource.network.tap import open_queue

    ns = f"katapy-gnet-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="kn-", dir="/tmp"))
    tap_fd = -1
    try:
        make_tap(ns, TAP, HOST_IP)
        tap_fd = run_in_netns(f"/var/run/netns/{ns}", open_queue, TAP)

        shared = workdir / "shared"
        make_busybox_rootfs(shared / "net" / "rootfs")
        async def main() -> tuple[int, bytes]:
            hv = hypervisor.select(cfg, name="builtin")
            try:
                await hv.add_device(NetDeviceSpec("net0", TAP, GUEST_MAC, tap_fd=tap_fd))
                vm = hypervisor.vm_config(cfg, "sb-net", shared_dir=shared, state_dir=workdir / "state")
                await hv.start_vm(vm)
                try:
                    connected = await dial_agent(hv, cfg.agent.port, 120)
                except Exception as exc:
                    console = hv.console_log()[-2000:]  # type: ignore[attr-defined]
                    raise AssertionError(f"the builtin guest's agent never answered: {exc}\n"
                                         f"console tail:\n{console}") from exc
                async with connected as agent:
                    from katapy.agent_client.types import Storage

                    await agent.create_sandbox("net", [], "sb-net", [
                        Storage("virtio-fs", "katapy-shared", "virtiofs", "/run/katapy/shared", [])])
                    iface = await agent.update_interface(Interface(
                        name="eth0", hw_addr=GUEST_MAC, mtu=1500, ip_addresses=[IPAddress(GUEST_IP, "24")]))
                    assert iface.hw_addr.lower() == GUEST_MAC
                    script = (f"ping -c 3 -W 5 {HOST_IP} && head -c {PAYLOAD} /dev/urandom > /tmp/p && "
                              f"nc {HOST_IP} 8000 < /tmp/p && sha256sum /tmp/p")
                    spec = make_spec("/run/katapy/shared/net/rootfs", ["sh", "-c", script], "net")
                    spec["process"]["capabilities"] = {k: ["CAP_NET_RAW"] for k in ("bounding", "effective",
                                                                                      "permitted")}
                    spec["process"]["noNewPrivileges"] = False
                    await agent.create_container("net", "net", spec)
                    await agent.start_container("net")
                    out = b""
                    while chunk := await agent.read_stdout("net", "net", 65536):
                        out += chunk
                    status = await agent.wait_process("net", "net")
                    await agent.remove_container("net", 10)
                    await agent.destroy_sandbox()
                    return status, out
            finally:
                with trio.CancelScope(shield=True):
                    await hv.stop_vm()
                    await hv.cleanup()

        sink = TcpSink(ns, HOST_IP, 8000)
        try:
            status, out = trio.run(main)
        finally:
            received = sink.close(wait=10)
        text = out.decode(errors="replace")
        assert status == 0, text
        assert "3 packets transmitted, 3 packets received" in text
        assert len(received) == PAYLOAD
        assert hashlib.sha256(received).hexdigest() in text
    finally:
        if tap_fd >= 0:
            os.close(tap_fd)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
