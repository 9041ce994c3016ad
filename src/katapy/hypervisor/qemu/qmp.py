"""A small QMP client over a unix socket (trio).

QMP (QEMU ``docs/interop/qmp-spec.rst``): the server sends a greeting
``{"QMP": {...}}``; the client must send ``qmp_capabilities`` before any other
command; each command ``{"execute": name, "arguments": {...}, "id": n}`` gets
exactly one ``{"return": ...}`` or ``{"error": {"class", "desc"}}`` carrying
the same id; asynchronous ``{"event": ...}`` messages may arrive at any time
and are kept in :attr:`QmpClient.events`.  Messages are JSON objects, one per
line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import trio

from katapy import log

_log = log.get("hypervisor.qemu.qmp")

MAX_MESSAGE = 1 << 20  # a QMP reply larger than this is a broken server


class QmpError(Exception):
    """QEMU answered a command with an error, or the QMP connection failed."""

    def __init__(self, message: str, error_class: str = ""):
        super().__init__(message)
        self.error_class = error_class


class QmpClient:
    def __init__(self, stream: trio.SocketStream):
        self._stream = stream
        self._buf = bytearray()
        self._next_id = 0
        self._lock = trio.Lock()
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls, path: Path, timeout: float, alive: Callable[[], bool] = lambda: True
    ) -> QmpClient:
        """Dial QEMU's QMP socket, retrying while it is not there yet, and negotiate capabilities.

        ``alive`` is polled between tries so that a QEMU that died early fails
        fast instead of waiting out ``timeout``.
        """
        with trio.move_on_after(timeout) as scope:
            while True:
                if not alive():
                    raise QmpError(f"QEMU exited before its QMP socket {path} answered")
                try:
                    stream = await trio.open_unix_socket(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.01)
        if scope.cancelled_caught:
            raise QmpError(f"QMP socket {path} did not answer within {timeout:.0f} s")
        client = cls(stream)
        try:
            with trio.fail_after(timeout):
                greeting = await client._read_message()
                if "QMP" not in greeting:
                    raise QmpError(f"unexpected QMP greeting: {greeting!r}")
                client.greeting = greeting["QMP"]
                await client.execute("qmp_capabilities")
        except BaseException:
            await client.aclose()
            raise
        return client

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one QMP command; return its ``return`` value or raise :class:`QmpError`."""
        async with self._lock:
            self._next_id += 1
            msg_id = self._next_id
            msg: dict[str, Any] = {"execute": command, "id": msg_id}
            if arguments:
                msg["arguments"] = arguments
            try:
                with trio.fail_after(timeout):
                    await self._stream.send_all(json.dumps(msg).encode() + b"\n")
                    while True:
                        reply = await self._read_message()
                        if "event" in reply:
                            self.events.append(reply)
                            continue
                        if reply.get("id") != msg_id:
                            _log.warning("QMP reply for another command dropped", reply=reply)
                            continue
                        break
            except trio.TooSlowError:
                raise QmpError(f"QMP {command}: no reply within {timeout:.0f} s") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise QmpError(f"QMP {command}: connection lost: {exc}") from None
        if "error" in reply:
            err = reply["error"]
            raise QmpError(f"QMP {command}: {err.get('desc', err)}", err.get("class", ""))
        return reply.get("return")

    async def drain_events(self, timeout: float = 0.5) -> None:
        """Collect events still buffered or in flight (QEMU sends SHUTDOWN just before it exits)."""
        async with self._lock:
            with trio.move_on_after(timeout):
                try:
                    while True:
                        msg = await self._read_message()
                        if "event" in msg:
                            self.events.append(msg)
                except (QmpError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def _read_message(self) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).strip()
                del self._buf[: nl + 1]
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise QmpError(f"QMP sent a line that is not JSON: {line[:200]!r}") from None
                if not isinstance(msg, dict):
                    raise QmpError(f"QMP sent a non-object: {line[:200]!r}")
                return msg
            if len(self._buf) > MAX_MESSAGE:
                raise QmpError("QMP message larger than 1 MiB")
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise QmpError(f"QMP connection lost: {exc}") from None
            if not chunk:
                raise QmpError("QMP connection closed by QEMU")
            self._buf += chunk

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
