"""The guest agent's log lines, forwarded into the shim's own log (and so into containerd's).

The agent dials the host (CID 2) on vsock port ``[agent] log_port`` and writes
one key=value line per event (``katapy.agent.log``; it redials while nobody
listens).  Over hybrid vsock the VMM connects a guest-initiated stream for
port P to the unix socket ``<vsock.sock>_P`` (Firecracker's convention, which
both backends follow; docs/agent.md), so the shim listens there once the VM
is up and re-logs every line with ``source=agent``, the way Kata's runtime
copies the agent's log stream into its own.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import trio

#: a line longer than this is cut (the agent's own lines are far shorter)
MAX_LINE = 16 * 1024
ACCEPT_BACKOFF_S = 0.1  # after accept(2) fails (EMFILE): do not spin
_LEVEL = re.compile(rb"\blevel=([a-z]+)")
_LEVELS = {b"debug": "debug", b"info": "info", b"warning": "warning", b"error": "error", b"critical": "critical"}


class AgentLogForwarder:
    """Listen on ``path`` and log each line an agent connection sends (at the line's own level)."""

    def __init__(self, path: Path, logger: Any) -> None:
        self.path = path
        self._log = logger
        self.lines = 0
        self._scope: trio.CancelScope | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(str(self.path))
            listener.listen(4)
            with trio.CancelScope() as scope:
                self._scope = scope
                task_status.started(self)
                async with trio.open_nursery() as nursery:
                    while True:
                        try:
                            conn, _ = await listener.accept()
                        except OSError as exc:  # EMFILE and the like: the shim must not die over its log
                            self._log.warning("agent log accept failed", error=str(exc))
                            await trio.sleep(ACCEPT_BACKOFF_S)
                            continue
                        nursery.start_soon(self._pump, conn)
        finally:
            listener.close()
            self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _pump(self, conn: trio.socket.SocketType) -> None:
        pending = b""
        with conn:
            while True:
                try:
                    data = await conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._emit(line)
                if len(pending) > MAX_LINE:
                    self._emit(pending[:MAX_LINE])
                    pending = b""
        if pending:
            self._emit(pending)

    def _emit(self, raw: bytes) -> None:
        raw = raw.strip()
        if not raw:
            return
        m = _LEVEL.search(raw)
        level = _LEVELS.get(m.group(1), "info") if m else "info"
        self.lines += 1
        getattr(self._log, level)("agent log", source="agent", line=raw[:MAX_LINE].decode(errors="replace"))
