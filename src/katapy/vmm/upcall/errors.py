"""The errors of the VMM's upcall client, each naming the request it concerns.

Every error is an :class:`UpcallError` (a ``RuntimeError``).  Which of them
leave the connection usable:

* :class:`UpcallRefused`: the guest answered with ``ret < 0``; the stream is in
  step, the connection stays.
* every other error drops the connection (a late or partial answer would
  desynchronise the strict request/response stream of dbs-upcall); the next
  request reconnects, except after :class:`UpcallClosed`.

``sent`` tells a caller whether the guest may have acted: True once the
request was (even partly) written, so after a timeout, a lost connection or a
garbage reply the outcome is in doubt (a refusal is sent too, but the guest
says it changed nothing); False when nothing was written (connect failures, a
bad greeting, :class:`UpcallBusy`, a closed channel), so the guest cannot have
acted.
"""
from __future__ import annotations

import errno as _errno
import os

from katapy.upcall import wire


def describe(req: wire.Request) -> str:
    """A request as it appears in messages: ``ADD_MEM(base=0x100000000, size=0x8000000)``."""
    p = req.payload
    if isinstance(p, wire.CpuRequest):
        return f"{req.type.name}(apic_ids={list(p.apic_ids)})"
    if isinstance(p, wire.MemRequest):
        return f"{req.type.name}(base={p.base:#x}, size={p.size:#x})"
    if isinstance(p, wire.MmioRequest):
        return f"{req.type.name}(base={p.base:#x}, size={p.size:#x}, irq={p.irq})"
    return req.type.name


class UpcallError(RuntimeError):
    """Base of the upcall client's errors.

    ``request``: the request concerned (None for a bare connect); ``sent``:
    whether it was written to the guest (see the module docstring).
    """

    def __init__(self, message: str, *, request: wire.Request | None = None, sent: bool = False) -> None:
        super().__init__(message)
        self.request = request
        self.sent = sent


class UpcallConnectError(UpcallError):
    """The channel could not be set up.

    The VMM's hybrid-vsock socket is missing, nothing listened on the guest's
    upcall port before ``connect_timeout`` (no upcall server in the guest
    kernel, or the guest has not booted that far), the VMM rejected the
    ``CONNECT`` line, or the guest sent no CONNECT greeting in time.
    """


class UpcallTimeout(UpcallError):
    """The guest did not answer a request in time; the connection was dropped."""


class UpcallBusy(UpcallError):
    """Another request held the channel for longer than this caller's timeout; nothing was sent."""


class UpcallConnectionLost(UpcallError):
    """EOF or a reset while a request was in flight; the connection was dropped."""


class UpcallProtocolError(UpcallError):
    """The guest sent something the wire format forbids (``__cause__``: wire's error); the connection was dropped."""


class UpcallClosed(UpcallError):
    """The channel was closed (:meth:`UpcallChannel.close`); it takes no more requests."""


class UpcallRefused(UpcallError):
    """The guest answered ``ret < 0``: ``errno`` (positive) says why; the connection stays usable.

    ``cpu_index`` is the guest's ``apic_index`` (the first CPU that failed) for
    ADD_CPU/DEL_CPU, None for other requests.
    """

    def __init__(self, request: wire.Request, errno: int, cpu_index: int | None = None) -> None:
        name = _errno.errorcode.get(errno, str(errno))
        msg = f"upcall {describe(request)}: the guest refused: {name} ({os.strerror(errno)})"
        if cpu_index is not None:
            msg += f"; first failed CPU index {cpu_index}"
        super().__init__(msg, request=request, sent=True)
        self.errno = errno
        self.cpu_index = cpu_index
