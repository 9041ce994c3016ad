"""The agent's end of port forwarding (katapy.agent.portforward), on host sockets: the request and
status lines (katapy.protocol.portforward), every way a stream is refused, and the byte copy with half-close.

A socketpair (or a unix listener for the accept loop) stands in for the vsock
stream from the shim; the forwarded-to server (katapy.testing.tcp_echo)
listens on an ephemeral 127.0.0.1 port of the test's own netns.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from katapy.agent import portforward as pf
from katapy.protocol import portforward as wire
from katapy.testing.tcp_echo import echo_server


def test_request_line_round_trips() -> None:
    for port in (1, 80, 8080, 65535):
        assert wire.parse_request(wire.request_line(port)) == port
    assert wire.request_line(8080) == b"PORT 8080\n"
    assert len(wire.request_line(65535)) <= wire.REQUEST_MAX


@pytest.mark.parametrize("line, why", [
    (b"PORT 0\n", "not in 1..65535"),
    (b"PORT 65536\n", "not in 1..65535"),
    (b"PORT 99999\n", "not in 1..65535"),
    (b"PORT 123456\n", "bad port"),
    (b"PORT -1\n", "bad port"),
    (b"PORT +80\n", "bad port"),
    (b"PORT 8 0\n", "bad port"),
    (b"PORT \n", "bad port"),
    (b"PORT 80", "not a port-forward request"),  # no newline
    (b"port 80\n", "not a port-forward request"),
    (b"CONNECT 80\n", "not a port-forward request"),
    (b"\xff\xfe\n", "not a port-forward request"),
    (b"PORT \xd9\xa8\n", "bad port"),  # a non-ASCII digit
])
def test_bad_requests_are_refused(line: bytes, why: str) -> None:
    with pytest.raises(wire.RequestError, match=why):
        wire.parse_request(line)


def test_request_line_refuses_ports_out_of_range() -> None:
    for port in (0, 65536, -5):
        with pytest.raises(wire.RequestError):
            wire.request_line(port)


def test_status_lines() -> None:
    assert wire.status_line() == b"OK\n"
    assert wire.parse_status(b"OK\n") is None
    assert wire.parse_status(wire.status_line("connect 127.0.0.1:81: Connection refused")) == \
        "connect 127.0.0.1:81: Connection refused"
    long = wire.status_line("x\n" * 1000)  # made one line, bounded
    assert long.endswith(b"\n") and long.count(b"\n") == 1 and len(long) == wire.STATUS_MAX
    assert "closed the stream" in wire.parse_status(b"")
    assert "closed the stream" in wire.parse_status(b"OK")
    assert "unexpected" in wire.parse_status(b"HELLO\n")
    assert wire.parse_status(b"ERR \n") == "unspecified error"


@pytest.fixture
def server() -> Iterator[tuple[int, list[bytes]]]:
    with echo_server() as found:
        yield found


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    return port


def _exchange(request: bytes) -> tuple[socket.socket, bytes, threading.Thread]:
    """Run ``handle`` on one end of a socketpair; send ``request`` on the other and read the status line."""
    host, guest = socket.socketpair()
    host.settimeout(10)
    t = threading.Thread(target=pf.handle, args=(guest,), daemon=True)
    t.start()
    host.sendall(request)
    return host, _status(host), t


def _status(s: socket.socket) -> bytes:
    """The agent's status line (or what came before EOF)."""
    line = b""
    while not line.endswith(b"\n") and (byte := s.recv(1)):
        line += byte
    return line


def _closed(host: socket.socket, t: threading.Thread) -> bool:
    """The agent's thread ended and its end is closed (a reset when it left our extra bytes unread)."""
    t.join(10)
    try:
        return not t.is_alive() and host.recv(1) == b""
    except ConnectionResetError:
        return not t.is_alive()


def test_forwards_both_ways_with_half_close(server: tuple[int, list[bytes]]) -> None:
    port, got = server
    host, line, t = _exchange(wire.request_line(port))
    assert line == b"OK\n"
    payload = bytes(range(256)) * 1000  # more than one chunk
    host.sendall(payload)
    host.shutdown(socket.SHUT_WR)  # the server answers only after this reached it
    reply = b""
    while chunk := host.recv(65536):
        reply += chunk
    assert reply == b"echo:" + payload
    assert got == [payload]
    t.join(10)
    assert not t.is_alive()
    host.close()


def test_nobody_listening_gets_an_error_line_and_a_close() -> None:
    port = _free_port()
    host, line, t = _exchange(wire.request_line(port))
    assert line.startswith(b"ERR ") and f"127.0.0.1:{port}".encode() in line and b"refused" in line
    assert _closed(host, t)
    host.close()


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.0\r\n\r\n",
    b"PORT 0\n",
    b"PORT 70000\n",
    b"P" * 100,  # no newline within REQUEST_MAX
    b"\x00\x01\x02\n",
])
def test_garbage_gets_an_error_line_and_a_close(request_bytes: bytes) -> None:
    host, line, t = _exchange(request_bytes)
    assert line.startswith(b"ERR ") and line.endswith(b"\n") and len(line) <= wire.STATUS_MAX
    assert _closed(host, t)
    host.close()


def test_the_host_closing_mid_request_ends_the_stream() -> None:
    host, guest = socket.socketpair()
    t = threading.Thread(target=pf.handle, args=(guest,), daemon=True)
    t.start()
    host.sendall(b"PORT 80")
    host.shutdown(socket.SHUT_WR)
    host.settimeout(10)
    assert host.recv(256).startswith(b"ERR ")
    assert _closed(host, t)
    host.close()


def test_the_accept_loop_bounds_connections(server: tuple[int, list[bytes]], tmp_path) -> None:
    """Beyond ``max_connections`` a stream gets ``ERR too many``; a finished stream frees its slot."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(tmp_path / "pf.sock"))
    lsock.listen(8)
    fwd = pf.Forwarder(lsock, max_connections=1)
    fwd.start()
    port, _ = server

    def dial() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(tmp_path / "pf.sock"))
        try:
            s.sendall(wire.request_line(port))
        except BrokenPipeError:
            pass  # refused before it read the request: its ERR line is still there to read
        return s

    try:
        first = dial()
        assert _status(first) == b"OK\n"
        second = dial()
        assert _status(second).startswith(b"ERR too many")
        second.close()
        first.shutdown(socket.SHUT_WR)
        assert first.recv(100) == b"echo:"
        first.close()
        for _ in range(50):  # the slot is released once the first stream's thread ends
            third = dial()
            line = _status(third)
            third.close()
            if line == b"OK\n":
                break
            time.sleep(0.1)
        assert line == b"OK\n"
    finally:
        lsock.shutdown(socket.SHUT_RDWR)  # ends the accept loop
        lsock.close()
