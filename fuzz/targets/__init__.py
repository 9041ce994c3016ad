"""One module per fuzz target; each exposes ``fuzz_one(data: bytes) -> None``.

:data:`TARGETS` names them in the order ``python -m fuzz.run`` runs them.
"""
TARGETS = ("queue", "blk", "net", "vsock", "fs", "vhost_user", "ttrpc", "oci_config", "upcall")
