"""virtio-net without a guest: the test plays the driver (real rings) against a real tap in a netns it makes.

The host end is the kernel's own IPv4/UDP stack behind the tap (10.77.0.1);
the "guest" (this test, MAC 02:00:00:00:00:02, 10.77.0.2) builds and parses
Ethernet frames itself, so each direction is checked byte for byte.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory
from katapy.vmm.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, EventFdInterrupt
from katapy.vmm.virtio.net import NetDevice, TapError
from katapy.vmm.virtio.net.device import VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, parse_mac
from katapy.vmm.virtio.net.header import HEADER_SIZE, VIRTIO_NET_HDR_F_NEEDS_CSUM, NetHeader

from cri.frames import checksum  # tests/ is on sys.path (rootdir-relative packages)
from .driver import DriverQueue
from .netns_tap import ip, make_tap

GUEST_MAC = "02:00:00:00:00:02"
HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
TAP = "ktap0"
RX_BUF = HEADER_SIZE + 1514  # Linux's small receive buffer: header + a 1500-MTU frame


@dataclass
class NetNs:
    name: str

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def run(self, fn, *args):  # type: ignore[no-untyped-def]
        from katapy.resource.network.netns import run_in_netns

        return run_in_netns(self.path, fn, *args)

    def host_mac(self) -> bytes:
        out = subprocess.run(["ip", "-n", self.name, "-o", "link", "show", TAP], check=True, capture_output=True,
                             text=True).stdout
        return parse_mac(out.split("link/ether ")[1].split()[0])


@pytest.fixture
def netns() -> Iterator[NetNs]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip) to make a network namespace and a tap")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")
    ns = NetNs(f"katapy-net-{uuid.uuid4().hex[:8]}")
    try:
        make_tap(ns.name, TAP, HOST_IP)
        subprocess.run(["ip", "netns", "exec", ns.name, "sysctl", "-qw", f"net.ipv6.conf.{TAP}.disable_ipv6=1"],
                       check=True)
        ip("-n", ns.name, "neigh", "add", GUEST_IP, "lladdr", GUEST_MAC, "dev", TAP, "nud", "permanent")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True)


class NetHarness:
    """A NetDevice on a running EventLoop, driven through two DriverQueues."""

    def __init__(self, ns: NetNs, features: int | None = None):
        from katapy.resource.network.tap import open_queue

        self.mem = GuestMemory.create([(0, 8 << 20)])
        self.dev = NetDevice(TAP, GUEST_MAC, tap_fd=ns.run(open_queue, TAP))
        self.dev.ack_features(self.dev.avail_features() if features is None else features)
        event_idx = self.dev.has_feature(VIRTIO_F_EVENT_IDX)
        self.rx = DriverQueue(self.mem, 0x1000, 0x100000, 0x300000, size=64, event_idx=event_idx)
        self.tx = DriverQueue(self.mem, 0x8000, 0x400000, 0x300000, size=64, event_idx=event_idx)
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
        self.loop = EventLoop("test-net")
        self.loop.start()
        self.dev.activate(self.mem, [self.rx.state(), self.tx.state()], self.kicks,
                          EventFdInterrupt({0: self.calls[0], 1: self.calls[1]}), self.loop)

    def post_rx(self, count: int, size: int = RX_BUF) -> None:
        for _ in range(count):
            self.rx.add_chain([(size, True)])
        os.eventfd_write(self.kicks[0], 1)

    def send(self, frame: bytes, header: bytes = bytes(HEADER_SIZE)) -> None:
        self.tx.add_chain([(header, False), (frame, False)])
        os.eventfd_write(self.kicks[1], 1)

    def used(self, q: DriverQueue, want: int, timeout: float = 15.0) -> list[tuple[int, int, bytes]]:
        got: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            got += q.take_used()
            time.sleep(0.01)
        return got

    def receive_udp(self, port: int, want: int, timeout: float = 15.0) -> list[bytes]:
        """Payloads of UDP datagrams to GUEST_IP:port that arrive in receive buffers."""
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            for _, length, data in self.rx.take_used():
                if length == 0:
                    continue
                hdr = NetHeader.unpack(data)
                assert hdr.num_buffers == 1 and hdr.flags == 0 and hdr.gso_type == 0
                payload = parse_udp(data[HEADER_SIZE:length], port)
                if payload is not None:
                    out.append(payload)
            time.sleep(0.01)
        return out

    def close(self) -> None:
        self.dev.close()
        self.loop.close()
        for fd in (*self.kicks, *self.calls):
            os.close(fd)
        self.mem.close()


@pytest.fixture
def net(netns: NetNs) -> Iterator[NetHarness]:
    h = NetHarness(netns)
    yield h
    h.close()


# -- frames, built and parsed by hand (RFC 894 Ethernet, RFC 791 IPv4, RFC 768 UDP) ----------------
def udp_frame(dst_mac: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                     socket.inet_aton(GUEST_IP), socket.inet_aton(HOST_IP))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + parse_mac(GUEST_MAC) + b"\x08\x00" + ip + udp


def parse_udp(frame: bytes, dport: int) -> bytes | None:
    if len(frame) < 42 or frame[:6] != parse_mac(GUEST_MAC) or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0xF) * 4
    if frame[23] != 17 or frame[30:34] != socket.inet_aton(GUEST_IP):
        return None
    sport_, dport_, length, _ = struct.unpack_from("!HHHH", frame, 14 + ihl)
    if dport_ != dport:
        return None
    return frame[14 + ihl + 8: 14 + ihl + length]


def _host_udp(ns: NetNs, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST_IP, port))
        s.settimeout(5)
        return s

    return ns.run(make)


# -- tests ----------------------------------------------------------------------------------------
def test_features_and_config_space(net: NetHarness) -> None:
    f = net.dev.avail_features()
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS):
        assert f >> bit & 1
    cfg = net.dev.config_space()
    assert cfg[:6] == parse_mac(GUEST_MAC)
    assert int.from_bytes(cfg[6:8], "little") == 1  # VIRTIO_NET_S_LINK_UP
    assert net.dev.read_config(0, 6) == parse_mac(GUEST_MAC)
    assert net.dev.read_config(4, 100) == bytes(100)  # out of range reads as zeros


def test_guest_to_host_udp(net: NetHarness, netns: NetNs) -> None:
    host = _host_udp(netns, 7000)
    with host:
        payloads = [os.urandom(n) for n in (1, 100, 1472)]  # 1472: a full 1500-byte IP packet
        for p in payloads:
            net.send(udp_frame(netns.host_mac(), 5555, 7000, p))
        got = [host.recvfrom(2048) for _ in payloads]
    assert [g[0] for g in got] == payloads
    assert all(g[1] == (GUEST_IP, 5555) for g in got)
    assert [length for _, length, _ in net.used(net.tx, 3)] == [0, 0, 0]
    assert net.dev.stats["tx_frames"] == 3 and net.dev.stats["tx_dropped"] == 0


def test_host_to_guest_udp_with_frames_waiting_for_buffers(net: NetHarness, netns: NetNs) -> None:
    host = _host_udp(netns, 7001)
    with host:
        payloads = [os.urandom(n) for n in (10, 1000, 1472)]
        for p in payloads:  # no receive buffer posted yet: the frames wait in the tap
            host.sendto(p, (GUEST_IP, 9000))
        time.sleep(0.3)
        assert net.rx.take_used() == []
        net.post_rx(8)
        got = net.receive_udp(9000, 3)
        assert got == payloads, (net.dev.stats, len(got))
        # and with buffers already posted
        host.sendto(b"late", (GUEST_IP, 9000))
        assert net.receive_udp(9000, 1) == [b"late"]


def test_bad_chains_are_dropped_and_the_device_goes_on(net: NetHarness, netns: NetNs) -> None:
    host = _host_udp(netns, 7002)
    with host:
        mac = netns.host_mac()
        net.tx.add_chain([(b"\0" * 5, False)])  # shorter than a header
        net.tx.add_chain([(NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM).pack(), False),
                          (udp_frame(mac, 1, 7002, b"csum"), False)])  # offload not negotiated
        net.tx.add_chain([(NetHeader(gso_type=1).pack(), False), (udp_frame(mac, 1, 7002, b"gso"), False)])
        net.tx.add_chain([(bytes(HEADER_SIZE), False), (b"\0" * 6, False)])  # no Ethernet header
        net.tx.add_chain([(bytes(HEADER_SIZE) + udp_frame(mac, 1, 7002, b"ok"), False), (64, True)])  # extra writable
        os.eventfd_write(net.kicks[1], 1)
        assert [length for _, length, _ in net.used(net.tx, 5)] == [0] * 5
        assert host.recvfrom(100)[0] == b"ok"  # the well-formed one went through
        assert net.dev.stats["tx_dropped"] == 4
        # receive chains too small, or device-readable, are completed empty and the frame dropped
        net.rx.add_chain([(20, True)])
        net.rx.add_chain([(b"x" * 8, False), (RX_BUF, True)])
        os.eventfd_write(net.kicks[0], 1)
        host.sendto(b"a" * 100, (GUEST_IP, 9001))
        host.sendto(b"b" * 100, (GUEST_IP, 9001))
        assert [length for _, length, _ in net.used(net.rx, 2)] == [0, 0]
        assert net.dev.stats["rx_dropped"] == 2
        net.post_rx(2)
        host.sendto(b"after", (GUEST_IP, 9001))
        assert net.receive_udp(9001, 1) == [b"after"]
    assert not net.dev.broken


def test_corrupt_ring_breaks_only_the_device(net: NetHarness) -> None:
    net.mem.write_u16(net.tx.avail + 2, 1000)  # avail.idx far past the ring size
    os.eventfd_write(net.kicks[1], 1)
    deadline = time.monotonic() + 5
    while not net.dev.broken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert net.dev.broken
    net.dev.reset()  # the transport resets a broken device; nothing is left registered


def test_tap_fd_checks_and_no_fd_leak(netns: NetNs) -> None:
    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    before = fds()
    from katapy.resource.network.tap import open_queue

    plain = netns.run(open_queue, TAP, False)  # no IFF_VNET_HDR: refused, fd closed
    with pytest.raises(TapError, match="IFF_VNET_HDR"):
        NetDevice(TAP, GUEST_MAC, tap_fd=plain)
    with pytest.raises(ValueError, match="MAC"):
        NetDevice(TAP, "01:00:00:00:00:01")  # multicast
    with pytest.raises(TapError, match="nosuchtap"):
        NetDevice("nosuchtap", GUEST_MAC)  # by name, in this (host) namespace
    h = NetHarness(netns)
    h.close()
    assert fds() == before


def test_transmit_frame_length_bounds(net: NetHarness) -> None:
    """A transmit chain holds one header and one Ethernet frame of 14..MAX_FRAME_LEN bytes (5.1.6.2);
    anything longer is dropped unread, however the driver spreads it over descriptors."""
    from katapy.vmm.virtio.net.header import MAX_FRAME_LEN

    too_long = b"\0" * (MAX_FRAME_LEN + 1)
    net.tx.add_chain([(bytes(HEADER_SIZE), False), (too_long[:40000], False), (too_long[40000:], False)])
    net.tx.add_chain([(bytes(HEADER_SIZE), False), (b"\0" * 13, False)])  # shorter than an Ethernet header
    os.eventfd_write(net.kicks[1], 1)
    assert [length for _, length, _ in net.used(net.tx, 2)] == [0, 0]
    assert net.dev.stats["bad_chains"] == 2 and net.dev.stats["tx_frames"] == 0
    assert not net.dev.broken
