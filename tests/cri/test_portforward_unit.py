"""katapy.resource.network.portforward: SO_ORIGINAL_DST decoding, the redirect rule, and the shim's
forwarder against a real pod netns, with the agent's own code behind a stand-in hybrid vsock.

The end-to-end path without a VM: a client *in the pod netns* dials
127.0.0.1:<port> -> the DNAT rule -> the forwarder's listener ->
SO_ORIGINAL_DST -> ``CONNECT 1026`` on a unix socket (the stand-in VMM answers
``OK 1`` and hands the stream to ``katapy.agent.portforward.handle``, as the
guest's agent would) -> 127.0.0.1:<port> in the test's netns, where an echo
server listens.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from katapy.agent import portforward as agent_pf
from katapy.resource.network import NetworkError
from katapy.resource.network import portforward as pf
from katapy.resource.network.netns import run_in_netns
from katapy.testing import fds
from katapy.testing.tcp_echo import echo_server

# SO_ORIGINAL_DST as this host's kernel returned it for a connection to 127.0.0.1:8080
RAW_8080 = bytes.fromhex("02001f907f0000010000000000000000")


def test_original_destination_decodes_sockaddr_in() -> None:
    assert pf.original_destination(RAW_8080) == pf.OriginalDestination("127.0.0.1", 8080)
    raw = bytearray(RAW_8080)
    raw[2:4] = (65535).to_bytes(2, "big")
    raw[4:8] = bytes([10, 1, 2, 3])
    assert pf.original_destination(bytes(raw)) == pf.OriginalDestination("10.1.2.3", 65535)


def test_original_destination_refuses_what_is_not_ipv4() -> None:
    with pytest.raises(pf.PortForwardError, match="family 10"):
        pf.original_destination(bytes([10, 0]) + RAW_8080[2:])  # AF_INET6
    with pytest.raises(pf.PortForwardError, match="not a sockaddr_in"):
        pf.original_destination(RAW_8080[:4])


def test_the_redirect_rule_names_katapy_and_the_sandbox() -> None:
    args = pf.RedirectRule("abc123").iptables_args("-A")
    text = " ".join(args)
    assert "-t nat -A OUTPUT -o lo -p tcp -d 127.0.0.1 ! --dport 65039" in text
    assert args[args.index("--comment") + 1] == "katapy port-forward abc123"
    assert args[-3:] == ["DNAT", "--to-destination", "127.0.0.1:65039"]
    assert pf.RedirectRule("abc123").iptables_args("-D")[3] == "-D"


def test_the_guest_port_is_the_agents() -> None:
    from katapy.agent.__main__ import DEFAULT_PORT, LOG_PORT
    from katapy.protocol.portforward import PORT_FORWARD_PORT

    assert pf.PortForwarder("s", "/x", Path("/y")).guest_port == PORT_FORWARD_PORT == 1026
    assert len({DEFAULT_PORT, LOG_PORT, PORT_FORWARD_PORT}) == 3


# -- against a real netns --------------------------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "nsenter")),
    reason="needs root, ip(8), iptables and nsenter")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kp-pf-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def echo_port() -> Iterator[int]:
    with echo_server() as (port, _):
        yield port


async def _stand_in_vmm(path: Path, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Hybrid vsock as the VMM speaks it: ``CONNECT 1026`` -> ``OK 1``; then the agent's ``handle``."""
    from katapy.agent_client.dial import receive_line

    async def one(stream: trio.SocketStream) -> None:
        line = await receive_line(stream, 64)
        if line != f"CONNECT {pf.PORT_FORWARD_PORT}\n".encode():
            await stream.aclose()
            return
        await stream.send_all(b"OK 1\n")
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(True)
        await trio.to_thread.run_sync(agent_pf.handle, sock)

    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(16)
    await trio.serve_listeners(one, [trio.SocketListener(listener)], task_status=task_status)


def _exchange(netns_path: str, port: int, payload: bytes) -> bytes:
    """From inside the pod netns: connect to 127.0.0.1:port, send, half-close, read to the end."""
    sock = run_in_netns(netns_path, socket.socket)
    with sock:
        sock.settimeout(20)
        sock.connect(("127.0.0.1", port))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def _nat_rules(netns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "nat", "-S", "OUTPUT"],
                          capture_output=True, text=True, check=True).stdout


@needs_root
def test_forwarded_connections_reach_the_agent_and_failures_reset(netns: str, echo_port: int,
                                                                   tmp_path: Path) -> None:
    path = f"/var/run/netns/{netns}"
    uds = tmp_path / "vsock.sock"
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nobody = closed.getsockname()[1]
    closed.close()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(_stand_in_vmm, uds)
            before = fds.snapshot()
            fwd = pf.PortForwarder("sb-unit", path, uds)
            await nursery.start(fwd.run)
            assert "katapy port-forward sb-unit" in _nat_rules(netns)
            for _ in range(2):
                payload = os.urandom(200_000)
                got = await trio.to_thread.run_sync(_exchange, path, echo_port, payload)
                assert got == b"echo:" + payload
            with pytest.raises(ConnectionResetError):  # nobody listens "in the guest": a reset, no data
                await trio.to_thread.run_sync(_exchange, path, nobody, b"x")
            await fwd.stop()
            assert fwd.active == 0
            assert "katapy" not in _nat_rules(netns)
            fds.wait_released(before)  # listener, accepted sockets, vsock streams: all closed
            with pytest.raises(ConnectionRefusedError):  # nothing redirects nor listens any more
                await trio.to_thread.run_sync(_exchange, path, echo_port, b"x")
            nursery.cancel_scope.cancel()

    trio.run(main)


@needs_root
def test_stop_after_the_netns_vanished_does_nothing_and_does_not_fail(netns: str, tmp_path: Path) -> None:
    path = f"/var/run/netns/{netns}"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            before = fds.snapshot()
            fwd = pf.PortForwarder("sb-gone", path, tmp_path / "no-vmm.sock")
            await nursery.start(fwd.run)
            subprocess.run(["ip", "netns", "del", netns], check=True)
            await fwd.stop()
            fds.wait_released(before)

    trio.run(main)


@needs_root
def test_a_vsock_that_does_not_answer_resets_the_connection(netns: str, echo_port: int, tmp_path: Path) -> None:
    path = f"/var/run/netns/{netns}"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fwd = pf.PortForwarder("sb-novmm", path, tmp_path / "no-vmm.sock")
            await nursery.start(fwd.run)
            with pytest.raises(OSError) as reset:
                await trio.to_thread.run_sync(_exchange, path, echo_port, b"x")
            # the RST may land before our half-close (ENOTCONN, EPIPE) or during the read (ECONNRESET)
            assert reset.value.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE), reset.value
            await fwd.stop()

    trio.run(main)


def test_setup_in_a_missing_netns_fails_before_serving(tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fwd = pf.PortForwarder("sb-x", str(tmp_path / "no-such-netns"), tmp_path / "v.sock")
            with pytest.raises(NetworkError, match="does not exist"):
                await nursery.start(fwd.run)

    trio.run(main)


@needs_root
def test_a_rule_that_cannot_be_installed_is_a_clear_error_and_the_pod_runs_on(
        netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """iptables failing (no nat table in the host kernel, say): PortForwardError with its message and what
    port forwarding needs, the listener closed again; SandboxNetwork logs it and carries on."""
    from katapy.resource.network.sandbox import SandboxNetwork

    fake = tmp_path / "iptables"
    fake.write_text("#!/bin/sh\necho \"iptables v1.8.9 (nf_tables): can't initialize iptables table 'nat'\" >&2\n"
                    "exit 3\n")
    fake.chmod(0o755)
    real_tool = pf._tool
    monkeypatch.setattr(pf, "_tool", lambda name: str(fake) if name == "iptables" else real_tool(name))
    path = f"/var/run/netns/{netns}"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            before = fds.snapshot()
            fwd = pf.PortForwarder("sb-nonat", path, tmp_path / "v.sock")
            with pytest.raises(pf.PortForwardError, match="can't initialize iptables table 'nat'.*needs iptables"):
                await nursery.start(fwd.run)
            fds.wait_released(before)
            net = SandboxNetwork(path, "sb-nonat")
            await net.forward_ports(nursery, tmp_path / "v.sock")
            assert net.port_forwarder is None
            await net.release()

    trio.run(main)


@needs_root
def test_katapy_check_finds_port_forwarding_available_here() -> None:
    assert pf.host_support() is None
