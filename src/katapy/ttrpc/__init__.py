"""ttrpc: containerd's lightweight RPC protocol (protobuf over a framed stream).

Modules (import them explicitly; this package imports no trio so that the guest
agent can use the threaded server without paying for trio):

* :mod:`katapy.ttrpc.frame` -- 10-byte header, encode, incremental FrameDecoder;
* :mod:`katapy.ttrpc.errors` -- ``Code`` and ``TtrpcError`` (+ per-code subclasses);
* :mod:`katapy.ttrpc.dispatch` -- request rules shared by both servers;
* :mod:`katapy.ttrpc.server` -- trio ``Server``;
* :mod:`katapy.ttrpc.client` -- trio ``Client``;
* :mod:`katapy.ttrpc.sync_server` -- stdlib-only threaded ``SyncServer``.

``from katapy.ttrpc import Server, Client, SyncServer`` also works; those names
load their module (and trio, for the first two) on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from katapy.ttrpc.errors import Code, TtrpcError

_LAZY = {
    "Server": "katapy.ttrpc.server",
    "Client": "katapy.ttrpc.client",
    "SyncServer": "katapy.ttrpc.sync_server",
    "RequestContext": "katapy.ttrpc.dispatch",
}

__all__ = ["Code", "TtrpcError", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
