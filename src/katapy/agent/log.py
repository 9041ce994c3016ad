"""The agent's logger: ``key=value`` lines on stderr and, when the host listens, on vsock port 1025.

Kata's agent sends its log to the host over vsock (runtime-rs reads guest
port 1025 as the log port); katapy's agent dials host CID 2 port 1025 and
writes the same lines there.  Failing to connect is normal (nobody listens)
and only means the lines go to stderr (the console under PID 1).

Standard library only, and cheap to import: structlog costs too much under
TCG emulation.
"""
from __future__ import annotations

import sys
import threading
import time

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_level = 20
_lock = threading.Lock()
_sinks: list[object] = []  # sockets the lines also go to


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def configure(level: str = "info") -> None:
    global _level
    _level = _LEVELS.get(level, 20)


def connect_vsock(port: int = 1025, cid: int = 2) -> bool:
    """Also send log lines to host ``cid``:``port`` over AF_VSOCK; False if nobody listens."""
    import socket

    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return False
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect((cid, port))
    except OSError:
        sock.close()
        return False
    with _lock:
        _sinks.append(sock)
    return True


RETRY_MAX_S = 5.0


def keep_vsock_connected(port: int = 1025, cid: int = 2) -> None:
    """Dial the host log port now and, from a daemon thread, again whenever no connection is up.

    The host may start listening after the agent (hybrid vsock: ``<uds>_1025``
    appears when the runtime wants the log) or close the stream; the retry
    interval doubles from 0.5 s up to RETRY_MAX_S while nobody listens.
    """
    connect_vsock(port, cid)

    def redial() -> None:
        delay = 0.5
        while True:
            time.sleep(delay)
            with _lock:
                connected = bool(_sinks)
            if connected:
                delay = 0.5
                continue
            if connect_vsock(port, cid):
                info("log connected to host", port=port)
                delay = 0.5
            else:
                delay = min(delay * 2, RETRY_MAX_S)

    threading.Thread(target=redial, name="log-port", daemon=True).start()


def _emit(level: str, event: str, fields: dict[str, object]) -> None:
    if _LEVELS[level] < _level:
        return
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    parts = [f"time={stamp}", f"level={level}", f"event={_quote(event)}", "component=agent"]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
    line = " ".join(parts) + "\n"
    with _lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        for sink in list(_sinks):
            try:
                sink.sendall(line.encode())  # type: ignore[attr-defined]
            except OSError:
                _sinks.remove(sink)
                sink.close()  # type: ignore[attr-defined]


def debug(event: str, **fields: object) -> None:
    _emit("debug", event, fields)


def info(event: str, **fields: object) -> None:
    _emit("info", event, fields)


def warning(event: str, **fields: object) -> None:
    _emit("warning", event, fields)


def error(event: str, **fields: object) -> None:
    _emit("error", event, fields)


class PrintfLogger:
    """The agent's log behind the stdlib ``Logger`` calls the ttrpc sync server makes
    (``log.warning("... %s", arg)``), without importing :mod:`logging`."""

    def __init__(self, component: str) -> None:
        self.component = component

    def _say(self, level: str, msg: str, args: tuple[object, ...]) -> None:
        try:
            text = msg % args if args else msg
        except (TypeError, ValueError):
            text = f"{msg} {args!r}"
        _emit(level, text, {"source": self.component})

    def debug(self, msg: str, *args: object) -> None:
        self._say("debug", msg, args)

    def info(self, msg: str, *args: object) -> None:
        self._say("info", msg, args)

    def warning(self, msg: str, *args: object) -> None:
        self._say("warning", msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._say("error", msg, args)

    def exception(self, msg: str, *args: object) -> None:
        import traceback

        self._say("error", msg + "\n" + traceback.format_exc(), args)
