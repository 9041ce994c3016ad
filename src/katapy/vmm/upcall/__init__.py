"""The VMM side of the upcall channel: asking the guest to take hot-plugged resources into use.

Kata's dbs-upcall (upstream: ``src/dragonball/crates/dbs_upcall`` in
kata-containers; the guest server is Kata's out-of-tree
``dragonball-experimental`` kernel patches).  docs/protocols.md, section
"upcall", has the protocol; the wire format lives in :mod:`katapy.upcall.wire`,
shared with the guest side (``katapy.agent.upcall``).

* :class:`UpcallChannel`: the blocking stream to guest vsock port 0xDB through
  the VMM's hybrid-vsock socket (handshake, ``b"d"`` service byte, CONNECT
  greeting, strict request/response, one request in flight).
* :class:`DeviceManagerClient`: typed ADD/DEL of CPUs, memory, virtio-mmio.
* the errors, all :class:`UpcallError` (a ``RuntimeError``).
"""
from katapy.vmm.upcall.channel import RETRY_INTERVAL_S, UpcallChannel
from katapy.vmm.upcall.errors import (
    UpcallBusy,
    UpcallClosed,
    UpcallConnectError,
    UpcallConnectionLost,
    UpcallError,
    UpcallProtocolError,
    UpcallRefused,
    UpcallTimeout,
    describe,
)
from katapy.vmm.upcall.service import DeviceManagerClient

__all__ = [
    "RETRY_INTERVAL_S", "DeviceManagerClient", "UpcallBusy", "UpcallChannel", "UpcallClosed", "UpcallConnectError",
    "UpcallConnectionLost", "UpcallError", "UpcallProtocolError", "UpcallRefused", "UpcallTimeout", "describe",
]
