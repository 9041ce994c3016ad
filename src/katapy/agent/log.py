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
