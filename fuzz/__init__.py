"""Fuzz harnesses for every parser of guest- or client-supplied bytes in katapy.

Each module in :mod:`fuzz.targets` exposes ``fuzz_one(data: bytes) -> None``,
which feeds ``data`` to the real parsing and handling code (virtqueue walking,
the virtio devices, the vhost-user back end, ttrpc framing and dispatch, OCI
spec and configuration checks, the upcall wire format).  ``fuzz_one`` returns
normally when the code under test either accepted the input or refused it with
the error its docstring names as clean; anything else (another exception, a
broken invariant, a hang) propagates and counts as a crash.

``python -m fuzz.run`` drives the targets (atheris when installed, a
corpus-seeded mutation driver otherwise); ``fuzz/corpus/<target>/`` holds the
seeds and every crasher found so far, replayed by ``tests/fuzz``.
"""
