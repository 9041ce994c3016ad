"""katapy.resource.network against real namespaces, veths, taps and tc filters.

A "pod" netns holds eth0 (a veth, as CNI's bridge plugin leaves it) whose
peer is in a "host" netns.  After ``setup`` the pod's eth0 no longer answers
by itself: every frame is redirected to the tap, and this test plays the
guest NIC on the tap's fd (answering ARP and ICMP echo with eth0's MAC and
IP), so a ping from the host netns succeeds only if frames cross the tc
redirect both ways.
"""
from __future__ import annotations

import os
import select
import shutil
import threading

import pytest

from katapy.resource import network
from katapy.resource.network import guest, tap, tcfilter
from katapy.resource.network.netns import run_in_netns

from .frames import answer
from .netns_fixture import VethPod, ip, ns_run

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and ip(8) to make network namespaces")


@pytest.fixture
def pod():
    p = VethPod.create(subnet_octet=os.getpid() % 200 + 1)
    try:
        yield p
    finally:
        p.close()


def _ping(p: VethPod, count: int = 1) -> bool:
    return ns_run(p.host_ns, "busybox", "ping", "-c", str(count), "-W", "2", p.pod_ip).returncode == 0


def test_reads_veth_and_connects_tap(pod):
    net = network.setup(pod.pod_path)
    try:
        assert len(net.endpoints) == 1
        ep = net.endpoints[0]
        assert ep.veth.name == "eth0" and ep.tap_name == "tap0_katapy" and ep.mtu == 1400
        mac = ip("-n", pod.pod_ns, "-o", "link", "show", "eth0").stdout.split("link/ether ")[1].split()[0]
        assert ep.guest_mac == mac
        assert [str(a) for a in ep.veth.addresses] == [f"{pod.pod_ip}/24"]
        default = [r for r in ep.veth.routes if r.dest == ""]
        assert default and default[0].gateway == pod.host_ip
        assert "tap0_katapy" in pod.links() and "mtu 1400" in pod.links().split("tap0_katapy")[1]
        assert "mirred (Egress Redirect to device tap0_katapy)" in pod.ingress_filters("eth0")
        assert "mirred (Egress Redirect to device eth0)" in pod.ingress_filters("tap0_katapy")

        def targets():
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                return tcfilter.redirect_targets(ipr, ep.veth.index), tcfilter.redirect_targets(ipr, ep.tap_index)
        assert run_in_netns(pod.pod_path, targets) == ([ep.tap_index], [ep.veth.index])

        ifaces = guest.interfaces(net)
        assert ifaces[0].hw_addr == mac and ifaces[0].mtu == 1400 and ifaces[0].name == "eth0"
        assert [(a.address, a.mask) for a in ifaces[0].ip_addresses] == [(pod.pod_ip, "24")]
        routes = guest.routes(net)
        assert routes[-1].dest == "" and routes[-1].gateway == pod.host_ip and routes[-1].device == "eth0"
    finally:
        network.teardown(net)
    assert "tap0_katapy" not in pod.links()
    assert pod.ingress_filters("eth0").strip() == ""


def test_frames_cross_the_redirect_both_ways(pod):
    assert _ping(pod), "the plain veth pair must work before katapy touches it"
    net = network.setup(pod.pod_path)
    fds: list[int] = []
    try:
        # stolen at eth0's ingress: nobody answers until something reads the tap
        assert not _ping(pod)
        fd = run_in_netns(pod.pod_path, tap.open_queue, "tap0_katapy", False)
        fds.append(fd)
        ep = net.endpoints[0]
        stop = threading.Event()
        seen: list[bytes] = []

        def play_guest() -> None:
            poller = select.poll()  # not select(): the suite may hold fds past FD_SETSIZE
            poller.register(fd, select.POLLIN)
            while not stop.is_set():
                if not poller.poll(100):
                    continue
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                seen.append(frame)
                reply = answer(frame, ep.guest_mac, pod.pod_ip)
                if reply is not None:
                    os.write(fd, reply)

        ip("-n", pod.host_ns, "neigh", "flush", "dev", "vhost0")  # make the host ask ARP again
        t = threading.Thread(target=play_guest, daemon=True)
        t.start()
        try:
            assert _ping(pod, count=2), f"ping through the tap failed; frames seen on the tap: {len(seen)}"
        finally:
            stop.set()
            t.join()
        assert any(f[12:14] == b"\x08\x06" for f in seen), "the ARP request did not reach the tap"
        assert any(f[12:14] == b"\x08\x00" for f in seen), "the ICMP echo did not reach the tap"
    finally:
        for fd in fds:
            os.close(fd)
        network.teardown(net)
    assert _ping(pod), "after teardown the veth answers by itself again"


def test_open_taps_gives_vnet_hdr_fds(pod):
    net = network.setup(pod.pod_path)
    try:
        fds = network.open_taps(net)
        try:
            assert len(fds) == 1
            flags = open(f"/proc/self/fdinfo/{fds[0]}").read()
            assert "iff:\ttap0_katapy" in flags or "tap0_katapy" in flags
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        network.teardown(net)


def test_missing_netns_is_a_clear_error():
    with pytest.raises(network.NetworkError, match="/var/run/netns/katapy-no-such-ns does not exist"):
        network.setup("/var/run/netns/katapy-no-such-ns")


def test_a_file_that_is_not_a_netns(tmp_path):
    f = tmp_path / "plain"
    f.write_text("")
    with pytest.raises(network.NetworkError, match="not a network namespace"):
        network.setup(str(f))


def test_netns_without_veth(pod):
    ip("-n", pod.pod_ns, "link", "del", "eth0")
    with pytest.raises(network.NetworkError, match="has no veth .*did CNI run"):
        network.setup(pod.pod_path)
    assert "katapy" not in pod.links()


def test_second_setup_in_the_same_netns_is_refused_and_leaves_the_first(pod):
    net = network.setup(pod.pod_path)
    try:
        with pytest.raises(network.NetworkError, match="tap0_katapy already exists"):
            network.setup(pod.pod_path)
        assert "tap0_katapy" in pod.links()
        assert "Redirect to device tap0_katapy" in pod.ingress_filters("eth0")
    finally:
        network.teardown(net)


def test_netns_vanishing_midway(pod):
    net = network.setup(pod.pod_path)
    ip("netns", "del", pod.pod_ns)
    with pytest.raises(network.NetworkError, match=f"{pod.pod_path} does not exist"):
        network.open_taps(net)
    network.teardown(net)  # nothing left to remove: not an error
    assert net.endpoints == []
    assert "tap0_katapy" not in ip("-o", "link", "show").stdout  # never leaked into the host netns


def test_spec_netns_path():
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}}
    assert network.netns_path_from_spec(spec) == "/var/run/netns/cni-1"
    assert network.netns_path_from_spec({"linux": {"namespaces": [{"type": "network"}]}}) is None
    assert network.netns_path_from_spec({}) is None
