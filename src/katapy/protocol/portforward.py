"""Port forwarding's wire protocol, one definition for the shim and the agent.

CRI PortForward (``kubectl port-forward``) makes containerd dial
``127.0.0.1:<port>`` in the pod netns on the host.  With katapy the listener
is in the guest, so the shim catches that connection
(``katapy.resource.network.portforward``) and opens one vsock stream per
connection to the agent's port-forward port (``PORT_FORWARD_PORT``), where
``katapy.agent.portforward`` dials ``127.0.0.1:<port>`` in the VM.

One exchange at the start of each stream, then raw bytes:

    host  -> agent   b"PORT <n>\\n"             n in 1..65535, decimal, at most REQUEST_MAX bytes
    agent -> host    b"OK\\n" | b"ERR <why>\\n"  one line, at most STATUS_MAX bytes

After ``OK`` bytes flow both ways; each side ends its direction with
shutdown(SHUT_WR).  ``ERR`` is followed by a close.  Standard library only
(this package is in the guest image).
"""
from __future__ import annotations

PORT_FORWARD_PORT = 1026  # the guest vsock port the agent serves these streams on
REQUEST_MAX = 16  # b"PORT 65535\n" is 11
STATUS_MAX = 256


class RequestError(ValueError):
    """A request line the agent will not act on; the message goes back in the ``ERR`` line."""


def request_line(port: int) -> bytes:
    """What the host sends first: ``PORT <port>\\n``."""
    if not 0 < port < 1 << 16:
        raise RequestError(f"port {port} is not in 1..65535")
    return f"PORT {port}\n".encode()


def parse_request(line: bytes) -> int:
    """The port of a ``PORT <n>\\n`` line; RequestError for anything else."""
    word, _, value = line.rstrip(b"\n").partition(b" ")
    if word != b"PORT" or not line.endswith(b"\n"):
        raise RequestError(f"not a port-forward request: {line[:REQUEST_MAX]!r}")
    if not (value.isdigit() and len(value) <= 5):
        raise RequestError(f"bad port {value[:REQUEST_MAX]!r}")
    port = int(value)
    if not 0 < port < 1 << 16:
        raise RequestError(f"port {port} is not in 1..65535")
    return port


def status_line(error: str | None = None) -> bytes:
    """``OK\\n``, or ``ERR <error>\\n`` with the error made one printable line that fits STATUS_MAX."""
    if error is None:
        return b"OK\n"
    text = "".join(c if c.isprintable() else " " for c in error)
    return f"ERR {text}".encode("ascii", "replace")[:STATUS_MAX - 1] + b"\n"


def parse_status(line: bytes) -> str | None:
    """None for ``OK``; the agent's reason for ``ERR``; a description of anything else (never raises)."""
    if line == b"OK\n":
        return None
    if not line.endswith(b"\n"):
        return f"the agent closed the stream before its status line (got {line[:STATUS_MAX]!r})"
    if line.startswith(b"ERR "):
        return line[4:-1].decode("ascii", "replace") or "unspecified error"
    return f"unexpected status line {line[:STATUS_MAX]!r}"
