"""CRI PortForward (``kubectl port-forward``) into a pod whose containers listen inside its VM.

What containerd does.  containerd 1.6's CRI plugin
(pkg/cri/server/sandbox_portforward_linux.go, ``criService.portForward``)
enters the sandbox's network namespace on the host (the CNI netns,
``/var/run/netns/cni-...``), dials ``tcp4 localhost:<port>`` there and copies
bytes both ways between that connection and the stream (``io.Copy`` each
way).  The first direction to end decides: an error from either copy, a
connection reset by the peer included, is returned and written on the
stream's error channel; a clean FIN is not an error.  A dial that fails is
reported the same way ("failed to connect to localhost:<port> inside
namespace ...").

Why that finds nobody with katapy.  In the tcfilter model the pod netns on
the host holds only the CNI veth, redirected with tc to a tap into the VM;
the containers' listeners are in the guest.

What katapy adds, for a CRI pod (one with a CNI netns), after the pod network
is set up:

1. a TCP listener on ``127.0.0.1:LISTEN_PORT`` *inside the pod netns*: the
   socket is created on a helper thread that did setns(2) into it
   (``netns.run_in_netns``, as ``pod.open_taps`` does for taps) and stays in
   that netns wherever the shim uses it; ``lo`` is brought up there;
2. in that netns the iptables rule (iptables-extensions(8), DNAT in the nat
   table's OUTPUT chain, which sees locally generated packets)::

       iptables -t nat -A OUTPUT -o lo -p tcp -d 127.0.0.1 ! --dport LISTEN_PORT \\
           -m comment --comment "katapy port-forward <sandbox id>" -j DNAT --to-destination 127.0.0.1:LISTEN_PORT

   DNAT rather than REDIRECT (the same effect for loopback traffic) because
   DNAT is the nat target every kernel with iptables nat has (xt_nat), while
   REDIRECT is a module of its own that minimal kernels -- the nested KVM
   harness's L1 among them -- leave out;

   so containerd's dial to any loopback port lands on that listener;
3. per accepted connection: the port containerd asked for is the original
   destination, ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (linux/netfilter_ipv4.h:
   ``SO_ORIGINAL_DST 80``), a ``struct sockaddr_in``; the shim opens a new
   hybrid-vsock stream to the agent's port-forward port
   (``katapy.agent_client.dial.dial_hybrid_vsock``), sends ``PORT <n>`` and
   reads the agent's status line (the protocol is ``katapy.protocol.portforward``);
   on ``OK`` it copies bytes both ways, each direction ended with
   shutdown(SHUT_WR), until both have ended;
4. on any failure (nothing listens in the guest, the agent's error, no vsock)
   the accepted socket is closed with SO_LINGER {1, 0}: a TCP reset, which
   containerd reports on the stream's error channel; the reason itself is in
   the shim's log (``port forward failed``).

Everything is bounded: SETUP_TIMEOUT_S per connection until the agent's
status, MAX_CONNECTIONS at once (more are reset).  ``stop`` cancels the
connections (their fds close with their tasks), closes the listener and
removes the rule; a netns that is already gone has nothing left to remove.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from katapy import log
from katapy.protocol import portforward as protocol
from katapy.protocol.portforward import PORT_FORWARD_PORT
from katapy.resource.network.netns import run_in_netns
from katapy.resource.network.types import NetworkError

LISTEN_PORT = 65039  # the shim's listener in the pod netns; every other loopback TCP port redirects to it
LOOPBACK = "127.0.0.1"
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, at SOL_IP
SOCKADDR_IN_SIZE = 16  # struct sockaddr_in (netinet/in.h)
BACKLOG = 64
MAX_CONNECTIONS = 64
SETUP_TIMEOUT_S = 20.0  # accept -> the agent's status line (vsock dial, the guest's connect); TCG is slow
IPTABLES_TIMEOUT_S = 30.0
CHUNK = 64 * 1024
ACCEPT_BACKOFF_S = 0.1  # after accept(2) fails (EMFILE, ENOMEM): do not spin
NEEDS = "port forwarding needs iptables (apt-get install iptables) and the nat table (DNAT) in the host kernel"


class PortForwardError(NetworkError):
    """Port forwarding cannot be set up for a pod, or one forwarded connection failed; the message says why."""


@dataclass(frozen=True)
class OriginalDestination:
    """Where a redirected connection was going: ``struct sockaddr_in`` from SO_ORIGINAL_DST."""

    address: str
    port: int


def original_destination(raw: bytes) -> OriginalDestination:
    """Decode ``struct sockaddr_in`` (netinet/in.h): ``sin_family`` in host byte order,
    ``sin_port`` and ``sin_addr`` in network byte order, then 8 bytes of padding."""
    if len(raw) < 8:
        raise PortForwardError(f"SO_ORIGINAL_DST gave {len(raw)} bytes, not a sockaddr_in")
    family, port = struct.unpack_from("=H", raw)[0], struct.unpack_from("!H", raw, 2)[0]
    if family != socket.AF_INET:
        raise PortForwardError(f"SO_ORIGINAL_DST gave address family {family}, not AF_INET")
    return OriginalDestination(socket.inet_ntoa(raw[4:8]), port)


@dataclass(frozen=True)
class RedirectRule:
    """The nat OUTPUT rule that sends the pod netns' loopback TCP to the shim's listener."""

    sandbox_id: str
    listen_port: int = LISTEN_PORT

    @property
    def comment(self) -> str:
        return f"katapy port-forward {self.sandbox_id}"

    def iptables_args(self, action: str) -> list[str]:
        """``iptables`` arguments; ``action`` is ``-A`` (append), ``-C`` (check) or ``-D`` (delete)."""
        port = str(self.listen_port)
        return ["--wait", "-t", "nat", action, "OUTPUT", "-o", "lo", "-p", "tcp", "-d", LOOPBACK, "!", "--dport", port,
                "-m", "comment", "--comment", self.comment, "-j", "DNAT", "--to-destination", f"{LOOPBACK}:{port}"]


def _tool(name: str) -> str:
    """A tool's path, also where a shim started with a short PATH would miss it."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise PortForwardError(f"{name} is not installed; {NEEDS}")
    return found


def _first_line(text: bytes | str) -> str:
    lines = (text.decode(errors="replace") if isinstance(text, bytes) else text).strip().splitlines()
    return lines[0] if lines else "(no message)"


async def _iptables(netns_path: str, rule: RedirectRule, action: str) -> None:
    """Apply ``rule`` in the pod netns (``nsenter --net=<path> iptables ...``); PortForwardError with its message."""
    cmd = [_tool("nsenter"), f"--net={netns_path}", _tool("iptables"), *rule.iptables_args(action)]
    try:
        with trio.fail_after(IPTABLES_TIMEOUT_S):
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    except trio.TooSlowError:
        raise PortForwardError(f"iptables in {netns_path} did not finish in {IPTABLES_TIMEOUT_S:.0f}s") from None
    except OSError as exc:
        raise PortForwardError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        raise PortForwardError(f"iptables -t nat {action} OUTPUT ... -j DNAT --to-destination "
                               f"{LOOPBACK}:{rule.listen_port} "
                               f"in pod netns {netns_path} failed: {_first_line(done.stderr or done.stdout)}; {NEEDS}")


def host_support() -> str | None:
    """None when this host can install the redirect rule (tried in a scratch netns); else why not."""
    if os.geteuid() != 0:
        return "unknown: trying it needs root"
    try:
        cmd = [_tool("unshare"), "--net", _tool("iptables"), *RedirectRule("check").iptables_args("-A")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT_S)
    except PortForwardError as exc:
        return str(exc)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"iptables in a scratch netns: {exc}"
    if done.returncode != 0:
        return f"iptables -t nat ... -j DNAT in a scratch netns failed: {_first_line(done.stderr)}; {NEEDS}"
    return None


def _listen_here(port: int) -> socket.socket:
    """In the pod netns (a run_in_netns thread): ``lo`` up, then a listener on 127.0.0.1:port."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname="lo"):
            ipr.link("set", index=index, state="up")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_listener(netns_path: str, port: int = LISTEN_PORT) -> socket.socket:
    """The listening socket, created inside the pod netns (blocking; call from a worker thread)."""
    try:
        return run_in_netns(netns_path, _listen_here, port)
    except OSError as exc:
        raise PortForwardError(f"cannot listen on {LOOPBACK}:{port} in pod netns {netns_path}: "
                               f"{exc.strerror or exc}") from None


def _reset(stream: trio.SocketStream) -> None:
    """Make the coming close a TCP RST (SO_LINGER {l_onoff 1, l_linger 0}, socket(7))."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already gone


async def splice(a: trio.SocketStream, b: trio.SocketStream) -> None:
    """Copy bytes both ways until both directions ended (EOF, then send_eof: shutdown(SHUT_WR) on the other).

    The first failure of either direction cancels the other and is raised.
    """
    failures: list[BaseException] = []

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, cancel: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(CHUNK):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            failures.append(exc)
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, nursery.cancel_scope)
        nursery.start_soon(pump, b, a, nursery.cancel_scope)
    if failures:
        raise failures[0]


class PortForwarder:
    """Port forwarding for one sandbox: ``await nursery.start(fwd.run)`` (raises PortForwardError when the
    host cannot), later ``await fwd.stop()``."""

    def __init__(self, sandbox_id: str, netns_path: str, agent_socket: Path,
                 guest_port: int = PORT_FORWARD_PORT, listen_port: int = LISTEN_PORT,
                 max_connections: int = MAX_CONNECTIONS, setup_timeout: float = SETUP_TIMEOUT_S) -> None:
        self.netns_path = netns_path
        self.agent_socket = agent_socket
        self.guest_port = guest_port
        self.rule = RedirectRule(sandbox_id, listen_port)
        self.max_connections = max_connections
        self.setup_timeout = setup_timeout
        self.active = 0  # connections being forwarded now
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._log = log.get("resource.network.portforward", sandbox_id=sandbox_id)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listener, rule, then serve until ``stop``; setup failures raise before ``started``."""
        try:
            sock = await trio.to_thread.run_sync(open_listener, self.netns_path, self.rule.listen_port)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            try:
                await _iptables(self.netns_path, self.rule, "-A")
            except BaseException:
                await listener.aclose()
                raise
            self._log.info("port forwarding ready", netns=self.netns_path, listen_port=self.rule.listen_port,
                           guest_port=self.guest_port)
            task_status.started()
            try:
                with self._scope:
                    async with trio.open_nursery() as connections:
                        await self._accept(listener, connections)
            finally:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
                    await self._remove_rule()
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Cancel the connections, close the listener, remove the rule; returns when all is gone."""
        self._scope.cancel()
        await self._done.wait()

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                client = await listener.accept()
            except OSError as exc:  # EMFILE and the like: the pod must not lose its shim over it
                self._log.warning("port forward accept failed", error=str(exc))
                await trio.sleep(ACCEPT_BACKOFF_S)
                continue
            if self.active >= self.max_connections:
                self._log.warning("port forward refused: too many connections", limit=self.max_connections)
                _reset(client)
                await client.aclose()
                continue
            self.active += 1
            connections.start_soon(self._forward, client)

    async def _forward(self, client: trio.SocketStream) -> None:
        """One connection: its original port, a vsock stream to the agent, the bytes; reset on failure."""
        port = 0
        clean = False
        try:
            raw = client.socket.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
            port = original_destination(raw).port
            with trio.fail_after(self.setup_timeout):
                guest = await self._open_guest(port)
            async with guest:
                self._log.debug("port forward connected", port=port)
                await splice(client, guest)
            clean = True
        except trio.TooSlowError:
            self._log.warning("port forward failed", port=port,
                              error=f"no status from the agent within {self.setup_timeout:.0f}s")
        except (PortForwardError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._log.warning("port forward failed", port=port, error=str(exc))
        finally:
            self.active -= 1
            if not clean:
                _reset(client)
            await client.aclose()

    async def _open_guest(self, port: int) -> trio.SocketStream:
        """A vsock stream to the agent, connected to the guest's ``127.0.0.1:port``; PortForwardError if not."""
        from katapy.agent_client.dial import LineTooLong, dial_hybrid_vsock, receive_line

        stream = await dial_hybrid_vsock(self.agent_socket, self.guest_port)
        try:
            await stream.send_all(protocol.request_line(port))
            try:
                why = protocol.parse_status(await receive_line(stream, protocol.STATUS_MAX))
            except LineTooLong as exc:
                why = str(exc)
            if why is not None:
                raise PortForwardError(f"guest port {port}: {why}")
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def _remove_rule(self) -> None:
        if not os.path.exists(self.netns_path):
            self._log.info("pod netns already gone; its redirect rule went with it", netns=self.netns_path)
            return
        try:
            await _iptables(self.netns_path, self.rule, "-D")
        except PortForwardError as exc:
            if os.path.exists(self.netns_path):
                self._log.error("port forward rule removal failed", error=str(exc))
                return
        self._log.info("port forwarding stopped", netns=self.netns_path)
