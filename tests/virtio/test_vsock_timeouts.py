"""Host-initiated hybrid vsock connects while the guest is slow to take packets (virtio 1.2, 5.10.6.4).

Regression for a failure seen with a real Linux guest on the built-in VMM's virtio-mmio transport
(test_vsock_guest.py::test_32_concurrent_connections[mmio] in the nested KVM harness): the 2 s wait
for the guest's RESPONSE was counted from the host's CONNECT line, so a REQUEST still waiting for an
RX buffer behind other connections' data was reset before the guest had seen it.  The wait now
starts when the REQUEST is put in the guest's RX queue; a REQUEST that finds no RX buffer at all is
given up after REQUEST_DELIVERY_TIMEOUT_S without an RST (the guest never heard of it).
"""
from __future__ import annotations

import socket
import time

import pytest

from katapy.testing import fds
from katapy.vmm.virtio.vsock import connection
from katapy.vmm.virtio.vsock.connection import PEER_TIMEOUT_S
from katapy.vmm.virtio.vsock.packet import OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW

from .test_vsock_fuzz import CID, RX_POSTED, VsockRig, loop_errors  # noqa: F401 (fixture)

GUEST_PORT = 5000


@pytest.fixture
def starved(tmp_path):
    """A rig whose guest has taken back none of the RX buffers it posted: the device has none free."""
    rig = VsockRig(tmp_path)
    try:
        for i in range(RX_POSTED):  # each unknown-connection RW is answered by an RST, one buffer each
            rig.send(rig.guest(20000 + i, 30000, OP_RW))
        assert len(rig.rx.take_used()) == RX_POSTED  # taken without re-posting
        yield rig
    finally:
        rig.close()


def _host_connect(rig: VsockRig, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PEER_TIMEOUT_S + 10)
    s.connect(rig.uds)
    s.sendall(f"CONNECT {port}\n".encode())
    return s


def test_response_wait_starts_when_the_request_reaches_the_guest(starved, loop_errors):
    rig = starved
    s = _host_connect(rig, GUEST_PORT)
    try:
        time.sleep(PEER_TIMEOUT_S + 1)  # longer than the RESPONSE wait, with the REQUEST still undelivered
        assert rig.received() == []
        rig.post_rx(8)
        got = rig.wait_received(lambda g: len(g) >= 1, "the REQUEST once RX buffers are posted")
        assert [(h.op, h.dst_port) for h, _ in got] == [(OP_REQUEST, GUEST_PORT)]
        req = got[0][0]
        rig.send(rig.guest(GUEST_PORT, req.src_port, OP_RESPONSE))
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(1)
            assert chunk, f"host stream closed before OK (got {line!r})"
            line += chunk
        assert line == f"OK {req.src_port}\n".encode()
        # and bytes flow guest -> host on it
        rig.send(rig.guest(GUEST_PORT, req.src_port, OP_RW, len=5), b"hello")
        assert s.recv(5) == b"hello"
    finally:
        s.close()


def test_guest_that_never_answers_a_delivered_request_is_reset(tmp_path, loop_errors):
    rig = VsockRig(tmp_path)
    s = _host_connect(rig, GUEST_PORT)
    try:
        got = rig.wait_received(lambda g: len(g) >= 1, "the REQUEST")
        assert [(h.op, h.dst_port) for h, _ in got] == [(OP_REQUEST, GUEST_PORT)]
        t0 = time.monotonic()
        assert s.recv(10) == b""  # no RESPONSE: the host stream is closed after PEER_TIMEOUT_S
        assert PEER_TIMEOUT_S - 0.5 <= time.monotonic() - t0 <= PEER_TIMEOUT_S + 5
        got = rig.wait_received(lambda g: len(g) >= 1, "the RST")
        assert [(h.op, h.dst_port, h.src_port) for h, _ in got] == [(OP_RST, GUEST_PORT, got[0][0].src_port)]
        assert rig.dev.muxer.conns == {}
    finally:
        s.close()
        rig.close()


def test_request_that_never_finds_an_rx_buffer_is_given_up_without_rst(starved, loop_errors, monkeypatch):
    monkeypatch.setattr(connection, "REQUEST_DELIVERY_TIMEOUT_S", 0.5)
    rig = starved
    before = fds.snapshot()
    s = _host_connect(rig, GUEST_PORT)
    try:
        t0 = time.monotonic()
        assert s.recv(10) == b""  # closed although the guest has no buffer for an RST either
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 5
        while rig.dev.muxer.conns:
            assert time.monotonic() < deadline, "the given-up connection stayed in the muxer"
            time.sleep(0.01)
        rig.post_rx(8)
        rig.on_loop(lambda: None)
        assert rig.received() == []  # neither the REQUEST nor an RST for a connection the guest never saw
    finally:
        s.close()
    fds.wait_released(before)
