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


class LineTooLong(ValueError):
    """A peer's line went past the limit without a newline; ``start`` holds its first bytes."""

    def __init__(self, start: bytes) -> None:
        super().__init__(f"line longer than {len(start)} bytes: {start!r}")
        self.start = start


async def receive_line(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    """One line up to and including ``\\n``, at most ``limit`` bytes; at EOF, what came before it.

    Byte by byte: whatever follows the newline belongs to the next layer (the
    agent's ttrpc, a forwarded connection), so none of it may be consumed here.
    """
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            return line
        line += chunk
        if len(line) > limit:
            raise LineTooLong(line[:limit])
    return line


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
            try:
                line = await receive_line(stream, MAX_REPLY)
            except LineTooLong as exc:
                raise DialError(0, f"hybrid vsock {uds_path}: reply too long: {exc.start!r}") from None
            if not line.endswith(b"\n"):
                raise DialError(0, f"hybrid vsock {uds_path}: closed during CONNECT {port} (guest not listening?)")
        if not line.startswith(b"OK"):
            raise DialError(0, f"hybrid vsock {uds_path}: CONNECT {port} refused: {line.strip()!r}")
        return stream
    except trio.TooSlowError:
        await stream.aclose()
        raise DialError(0, f"hybrid vsock {uds_path}: no reply to CONNECT {port} within {timeout:.0f}s") from None
    except BaseException:
        await stream.aclose()
        raise
