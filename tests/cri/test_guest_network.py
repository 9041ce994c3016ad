"""A real guest behind the pod network: QEMU's virtio-net on a tap fd opened in the pod netns.

The VM is booted with the QEMU backend (no shared filesystem: no container
runs, only the agent), its NIC added by ``SandboxNetwork.attach``; the agent
gives the NIC the veth's MAC, address and routes (UpdateInterface,
UpdateRoutes).  Then the host netns pings the pod IP: the guest kernel
answers, through tc redirect both ways.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import trio

from katapy import config as kconfig
from katapy import hypervisor, paths
from katapy.resource.network.sandbox import SandboxNetwork

from .netns_fixture import VethPod, ns_run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make network namespaces")]


def _config() -> kconfig.KatapyConfig:
    return kconfig.from_dict({
        "hypervisor": {"name": "qemu", "kernel": str(paths.guest_bzimage()), "initrd": str(paths.guest_initramfs()),
                       "shared_fs": "none", "default_memory": 512},
        "agent": {"dial_timeout": 90.0},
    }, check_files=False)


def test_guest_answers_at_the_pod_ip():
    from katapy.shim.agent_dial import dial_agent
    from katapy.testing.sandbox import missing_requirements

    cfg = _config()
    why = missing_requirements(cfg, backend="qemu")
    if why:
        pytest.skip(f"no sandbox VM here: {why}")
    pod = VethPod.create(subnet_octet=(os.getpid() % 200) + 30)
    state = Path(tempfile.mkdtemp(prefix="kpnet-", dir="/tmp"))
    sid = f"net-{uuid.uuid4().hex[:8]}"
    result: dict[str, object] = {}

    async def main() -> None:
        hv = hypervisor.select(cfg, name="qemu")
        net = SandboxNetwork(pod.pod_path, sid)
        try:
            await net.attach(hv)
            vm = hypervisor.vm_config(cfg, sid, state_dir=state / sid)
            await hv.start_vm(vm)
            net.close_fds()  # QEMU holds its own copy now
            agent_cm = await dial_agent(hv, cfg.agent.port, cfg.agent.dial_timeout, vm.console_path)
            async with agent_cm as agent:
                await net.configure_guest(agent)
                result["interfaces"] = await agent.list_interfaces()
                result["routes"] = await agent.list_routes()
                ping = await trio.to_thread.run_sync(
                    lambda: ns_run(pod.host_ns, "busybox", "ping", "-c", "3", "-W", "5", pod.pod_ip, timeout=60))
                result["ping"] = ping
                result["console"] = hv.cfg.console_path.read_text(errors="replace")[-2000:] if hv.cfg else ""
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await hv.stop_vm()
                finally:
                    await hv.cleanup()
                    await net.release()

    try:
        trio.run(main)
        ifaces = {i.hw_addr: i for i in result["interfaces"]}  # type: ignore[attr-defined]
        mac = ns_run(pod.pod_ns, "cat", "/sys/class/net/eth0/address").stdout.strip()
        assert mac in ifaces, f"guest NICs {list(ifaces)} lack the veth MAC {mac}"
        guest_if = ifaces[mac]
        # the guest kernel adds an IPv6 link-local address of its own once the link is up (timing-dependent)
        addresses = [a.address for a in guest_if.ip_addresses if not a.address.lower().startswith("fe80:")]
        assert guest_if.name == "eth0" and addresses == [pod.pod_ip], guest_if.ip_addresses
        assert any(r.dest == "" and r.gateway == pod.host_ip for r in result["routes"])  # type: ignore[attr-defined]
        ping = result["ping"]
        assert ping.returncode == 0, f"ping from the host netns failed: {ping.stdout}{ping.stderr}"  # type: ignore[attr-defined]
    finally:
        links = pod.links()
        filters = pod.ingress_filters("eth0")
        pod.close()
        shutil.rmtree(state, ignore_errors=True)
    assert "tap0_katapy" not in links and filters.strip() == "", (links, filters)
    assert not subprocess.run(["pgrep", "-f", f"katapy-{sid}"], capture_output=True).stdout
