"""Reaching the agent from the host: hybrid vsock, or a plain unix socket.

Hybrid vsock (Firecracker docs/vsock.md, Dragonball vsock muxer): connect to
the sandbox's unix socket, write ``CONNECT <port>\\n``, read one line; a line
starting with ``OK`` (``OK <host port>``) means the VMM connected the guest
port, after which the stream carries raw bytes.  The VMM closes the stream
when nothing listens on the guest port yet.
"""
from __future__ import annotations

import os

import trio

HANDSHAKE_TIMEOUT_S = 10.0
MAX_REPLY = 64


class DialError(OSError):
    """The agent could not be reached (yet)."""


async def dial_unix(path: str | os.PathLike[str]) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(os.fspath(path))
    except OSError as exc:
        raise DialError(exc.errno, f"dial {os.fspath(path)}: {exc.strerror or exc}") from None


async def dial_hybrid_vsock(uds_path: str | os.PathLike[str], port: int,
                            timeout: float = HANDSHAKE_TIMEOUT_S) -> trio.SocketStream:
    """A stream to guest vsock ``port`` through the VMM's hybrid vsock socket."""
    stream = await dial_unix(uds_path)
    try:
        with trio.fail_after(timeout):
            await stream.send_all(f"CONNECT {port}\n".encode())
            line = b""
            # Byte by byte: whatever follows the newline belongs to the agent.
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(1)
                if not chunk:
                    raise DialError(0, f"hybrid vsock {uds_path}: closed during CONNECT {port} (guest not listening?)")
                line += chunk
                if len(line) > MAX_REPLY:
                    raise DialError(0, f"hybrid vsock {uds_path}: reply too long: {line[:MAX_REPLY]!r}")
        if not line.startswith(b"OK"):
            raise DialError(0, f"hybrid vsock {uds_path}: CONNECT {port} refused: {line.strip()!r}")
        return stream
    except trio.TooSlowError:
        await stream.aclose()
        raise DialError(0, f"hybrid vsock {uds_path}: no reply to CONNECT {port} within {timeout:.0f}s") from None
    except BaseException:
        await stream.aclose()
        raise
