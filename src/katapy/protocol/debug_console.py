"""The debug console's framing, one definition for both ends.

The stream is the guest vsock port ``DEBUG_CONSOLE_PORT``, reached from the
host through the VMM's hybrid vsock (``CONNECT 1027``).  Kata's debug console
is a raw shell on a vsock port; katapy frames it so that one stream carries a
command line, a terminal size that changes, separate stdout and stderr, and
the exit status.

Every frame is ``type (u8) | length (u32, big endian) | payload``, the payload
at most ``MAX_PAYLOAD`` bytes:

    host -> guest   OPEN       JSON {"argv": [..], "tty": bool, "rows": n, "cols": n, "term": s}
                               first and once; an empty argv is the guest's shell
                    STDIN      bytes for the process's stdin (the tty's input)
                    STDIN_EOF  no payload: close the process's stdin
                    RESIZE     rows (u16) | cols (u16): TIOCSWINSZ on the tty
    guest -> host   STDOUT     bytes (with a tty, everything the tty shows)
                    STDERR     bytes (only without a tty)
                    EXIT       status (i32): the exit code, 128 + signal for a signal
                    ERROR      UTF-8 text: why the command did not start; the stream ends

Either side drops the stream on a frame it does not expect (the host does not
trust the guest's bytes; the guest treats the host's as a bug): a
:class:`ConsoleProtocolError` names it.  Standard library only.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

DEBUG_CONSOLE_PORT = 1027  # 1024 the agent's API, 1025 its log, 1026 port forwarding
HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 64 * 1024
MAX_OPEN = 16 * 1024  # argv and the rest of OPEN
MAX_ERROR = 4096

OPEN, STDIN, STDIN_EOF, RESIZE = 1, 2, 3, 4
STDOUT, STDERR, EXIT, ERROR = 16, 17, 18, 19
HOST_TYPES = frozenset({OPEN, STDIN, STDIN_EOF, RESIZE})
GUEST_TYPES = frozenset({STDOUT, STDERR, EXIT, ERROR})
_WINSIZE = struct.Struct(">HH")
_STATUS = struct.Struct(">i")


class ConsoleProtocolError(ValueError):
    """A frame the receiving side will not act on."""


@dataclass(frozen=True)
class OpenRequest:
    argv: list[str] = field(default_factory=list)
    tty: bool = False
    rows: int = 24
    cols: int = 80
    term: str = "linux"


def frame(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ConsoleProtocolError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


def parse_header(header: bytes, allowed: frozenset[int]) -> tuple[int, int]:
    """(type, payload length) of a frame header; ConsoleProtocolError for a type not in ``allowed`` or a
    length past the limit."""
    kind, length = HEADER.unpack(header)
    if kind not in allowed:
        raise ConsoleProtocolError(f"unexpected frame type {kind}")
    if length > MAX_PAYLOAD:
        raise ConsoleProtocolError(f"frame type {kind} announces {length} bytes (limit {MAX_PAYLOAD})")
    return kind, length


def open_frame(req: OpenRequest) -> bytes:
    return frame(OPEN, json.dumps({"argv": req.argv, "tty": req.tty, "rows": req.rows, "cols": req.cols,
                                   "term": req.term}).encode())


def parse_open(payload: bytes) -> OpenRequest:
    if len(payload) > MAX_OPEN:
        raise ConsoleProtocolError(f"OPEN of {len(payload)} bytes exceeds {MAX_OPEN}")
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConsoleProtocolError(f"OPEN is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConsoleProtocolError("OPEN is not a JSON object")
    argv, tty, term = raw.get("argv", []), raw.get("tty", False), raw.get("term", "linux")
    if not isinstance(argv, list) or not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise ConsoleProtocolError("OPEN argv must be a list of strings without NUL")
    if not isinstance(tty, bool) or not isinstance(term, str) or "\0" in term:
        raise ConsoleProtocolError("OPEN tty must be a boolean and term a string")
    rows, cols = raw.get("rows", 24), raw.get("cols", 80)
    return OpenRequest(argv, tty, *_winsize(rows, cols), term=term or "linux")


def _winsize(rows: object, cols: object) -> tuple[int, int]:
    if not (isinstance(rows, int) and isinstance(cols, int) and 0 <= rows < 1 << 16 and 0 <= cols < 1 << 16):
        raise ConsoleProtocolError(f"window size {rows!r}x{cols!r} is not two 16-bit numbers")
    return rows, cols


def resize_frame(rows: int, cols: int) -> bytes:
    return frame(RESIZE, _WINSIZE.pack(*_winsize(rows, cols)))


def parse_resize(payload: bytes) -> tuple[int, int]:
    if len(payload) != _WINSIZE.size:
        raise ConsoleProtocolError(f"RESIZE of {len(payload)} bytes (want {_WINSIZE.size})")
    rows, cols = _WINSIZE.unpack(payload)
    return rows, cols


def exit_frame(status: int) -> bytes:
    return frame(EXIT, _STATUS.pack(status))


def parse_exit(payload: bytes) -> int:
    if len(payload) != _STATUS.size:
        raise ConsoleProtocolError(f"EXIT of {len(payload)} bytes (want {_STATUS.size})")
    return _STATUS.unpack(payload)[0]


def error_frame(text: str) -> bytes:
    return frame(ERROR, text.encode("utf-8", "replace")[:MAX_ERROR])


def parse_error(payload: bytes) -> str:
    if len(payload) > MAX_ERROR:
        raise ConsoleProtocolError(f"ERROR of {len(payload)} bytes exceeds {MAX_ERROR}")
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in payload.decode("utf-8", "replace"))


class FrameReader:
    """Frames out of a blocking socket-like object (``recv``); None at a clean EOF between frames."""

    def __init__(self, sock, allowed: frozenset[int]) -> None:  # type: ignore[no-untyped-def]
        self._sock = sock
        self._allowed = allowed

    def _exact(self, n: int, what: str) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                if buf or what != "header":
                    raise ConsoleProtocolError(f"stream ended inside a frame's {what}")
                return None
            buf += chunk
        return buf

    def next(self) -> tuple[int, bytes] | None:
        header = self._exact(HEADER.size, "header")
        if header is None:
            return None
        kind, length = parse_header(header, self._allowed)
        payload = self._exact(length, "payload") if length else b""
        return kind, payload or b""
