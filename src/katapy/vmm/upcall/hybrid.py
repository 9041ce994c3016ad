"""A blocking client for the hybrid-vsock handshake (Firecracker docs/vsock.md, Dragonball's vsock muxer).

The built-in VMM's muxer (katapy.vmm.virtio.vsock.muxer) listens on a unix
socket; a client writes ``CONNECT <port>\\n`` and, once the guest accepted the
vsock connection, reads ``OK <host port>\\n``; then the stream carries raw
bytes.  When nothing listens on the guest port, the guest answers the vsock
REQUEST with RST and the muxer closes the unix stream without writing
anything: the client sees EOF before any reply line.

This is the synchronous twin of ``katapy.agent_client.dial.dial_hybrid_vsock``
(trio), for callers on plain threads such as the VMM's upcall client.
"""
from __future__ import annotations

import errno
import os
import socket
import time

MAX_REPLY = 64


class HybridVsockError(OSError):
    """The hybrid-vsock handshake failed."""


class VsockSocketUnavailable(HybridVsockError):
    """The VMM's hybrid-vsock unix socket could not be connected (missing, or nobody accepts)."""


class GuestPortNotListening(HybridVsockError):
    """The VMM closed the stream before answering ``CONNECT``: nothing listens on the guest port (yet)."""


class HandshakeRejected(HybridVsockError):
    """The VMM answered ``CONNECT`` with something other than ``OK ...``."""


class HandshakeTimeout(HybridVsockError):
    """No answer to ``CONNECT`` in time."""


def dial(uds_path: str | os.PathLike[str], port: int, timeout: float) -> socket.socket:
    """A blocking stream socket to guest vsock ``port``, handshake done, no timeout set.

    Raises one of the :class:`HybridVsockError` subclasses; the socket is
    closed on every failure.  The reply line is read byte by byte so nothing
    past its newline is consumed.
    """
    path = os.fspath(uds_path)
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(max(timeout, 0.001))
        try:
            sock.connect(path)
        except TimeoutError:
            raise HandshakeTimeout(errno.ETIMEDOUT, f"hybrid vsock {path}: connect timed out") from None
        except OSError as exc:
            raise VsockSocketUnavailable(exc.errno, f"hybrid vsock {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                b = sock.recv(1)
                if not b:
                    raise GuestPortNotListening(
                        errno.ECONNRESET, f"hybrid vsock {path}: closed during CONNECT {port} (guest not listening)")
                line += b
                if len(line) > MAX_REPLY:
                    raise HandshakeRejected(errno.EPROTO, f"hybrid vsock {path}: reply to CONNECT {port} too long: "
                                                          f"{line[:MAX_REPLY]!r}")
        except TimeoutError:
            raise HandshakeTimeout(errno.ETIMEDOUT,
                                   f"hybrid vsock {path}: no reply to CONNECT {port} within {timeout:g}s") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise GuestPortNotListening(exc.errno, f"hybrid vsock {path}: {exc.strerror} during CONNECT {port} "
                                                   f"(guest not listening)") from None
        if not line.startswith(b"OK"):
            raise HandshakeRejected(errno.ECONNREFUSED, f"hybrid vsock {path}: CONNECT {port} refused: "
                                                        f"{line.strip()!r}")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise
