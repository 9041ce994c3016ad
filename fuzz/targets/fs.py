"""Target ``fs``: FUSE requests (katapy.vmm.virtio.fs) served from a temp shared directory.

Fuzzed: ``fuse_in_header`` (``len`` against the chain, every opcode the server
handles and unknown ones, ``unique``, ``nodeid``, uid/gid) and every op's body
(its struct with boundary values, file types for MKNOD/CREATE, names with
``..``, ``/``, empty or unterminated, xattr names and sizes, READ/WRITE sizes
and offsets, BATCH_FORGET counts), as sequences after INIT, on hostile rings.
The shared directory holds a file, a directory, and a symlink that points
outside it; ``outside/secret`` sits beside it.

Clean outcomes: a reply with ``-errno`` (OSError, OverflowError), no reply
(NoReply for FORGET), a chain completed empty, DeviceError from activate, the
device marking itself broken.  A crash is any other exception out of a FUSE
handler (the device would answer EIO and log "fuse handler crashed"), or any
change outside the shared directory.  Files are bounded to 1 MiB
(RLIMIT_FSIZE) and SYNCFS's host-wide ``sync()`` is counted, not run, so the
fuzzer cannot fill or stall the host.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
from unittest import mock

from fuzz.common import (
    HostileGuest, Input, Part, RecordingInterrupt, StepLoop, eventfds, file_size_bound, readable, writable,
)
from katapy.vmm.memory import GuestMemoryError
from katapy.vmm.virtio.device import DeviceError
from katapy.vmm.virtio.fs import fuse as F
from katapy.vmm.virtio.fs.device import FsDevice
from katapy.vmm.virtio.fs.passthrough import FuseServer, NoReply, Request
from katapy.vmm.virtio.queue import Writer

#: opcode -> (its fixed struct or None, how many NUL-terminated names follow)
OPS: dict[int, tuple[struct.Struct | None, int]] = {
    F.LOOKUP: (None, 1), F.FORGET: (F.FORGET_IN, 0), F.GETATTR: (F.GETATTR_IN, 0), F.SETATTR: (F.SETATTR_IN, 0),
    F.READLINK: (None, 0), F.SYMLINK: (None, 2), F.MKNOD: (F.MKNOD_IN, 1), F.MKDIR: (F.MKDIR_IN, 1),
    F.UNLINK: (None, 1), F.RMDIR: (None, 1), F.RENAME: (F.RENAME_IN, 2), F.LINK: (F.LINK_IN, 1),
    F.OPEN: (F.OPEN_IN, 0), F.READ: (F.READ_IN, 0), F.WRITE: (F.WRITE_IN, 0), F.STATFS: (None, 0),
    F.RELEASE: (F.RELEASE_IN, 0), F.FSYNC: (F.FSYNC_IN, 0), F.SETXATTR: (F.SETXATTR_IN, 1),
    F.GETXATTR: (F.GETXATTR_IN, 1), F.LISTXATTR: (F.GETXATTR_IN, 0), F.REMOVEXATTR: (None, 1),
    F.FLUSH: (F.FLUSH_IN, 0), F.INIT: (F.INIT_IN, 0), F.OPENDIR: (F.OPEN_IN, 0), F.READDIR: (F.READ_IN, 0),
    F.RELEASEDIR: (F.RELEASE_IN, 0), F.FSYNCDIR: (F.FSYNC_IN, 0), F.ACCESS: (F.ACCESS_IN, 0),
    F.CREATE: (F.CREATE_IN, 1), F.INTERRUPT: (None, 0), F.DESTROY: (None, 0),
    F.BATCH_FORGET: (F.BATCH_FORGET_IN, 0), F.FALLOCATE: (F.FALLOCATE_IN, 0), F.READDIRPLUS: (F.READ_IN, 0),
    F.RENAME2: (F.RENAME2_IN, 2), F.LSEEK: (F.LSEEK_IN, 0), F.SYNCFS: (None, 0),
}
_OPCODES = tuple(OPS)
_NAMES = (b"f", b"d", b"l", b"new", b"fifo", b"..", b".", b"d/g", b"", b"user.x", b"trusted.x",
          b"security.capability", b"x" * 300)
_MODES = (0o100644, 0o40755, 0o20644, 0o60644, 0o10644, 0o140644, 0o120777, 0o4755)
_state: dict[str, object] = {}


def _layout(top: str) -> None:
    """The shared directory as every case finds it."""
    shared = os.path.join(top, "shared")
    shutil.rmtree(shared, ignore_errors=True)
    os.mkdir(shared)
    with open(os.path.join(shared, "f"), "wb") as f:
        f.write(b"file contents\n" * 64)
    os.mkdir(os.path.join(shared, "d"))
    open(os.path.join(shared, "d", "g"), "wb").close()
    os.symlink("../outside/secret", os.path.join(shared, "l"))


def _outside_state(top: str) -> tuple:
    secret = os.path.join(top, "outside", "secret")
    st = os.lstat(secret)
    with open(secret, "rb") as f:
        content = f.read()
    return (sorted(os.listdir(top)), sorted(os.listdir(os.path.join(top, "outside"))), st.st_mode, st.st_uid,
            st.st_size, st.st_mtime_ns, content, sorted(os.listxattr(secret)))


def _setup() -> tuple[FsDevice, str]:
    if "dev" not in _state:
        top = tempfile.mkdtemp(prefix="katapy-fuzz-fs-")
        os.mkdir(os.path.join(top, "outside"))
        with open(os.path.join(top, "outside", "secret"), "wb") as f:
            f.write(b"host secret\n")
        _layout(top)
        _state["top"] = top
        _state["outside"] = _outside_state(top)
        _state["dev"] = FsDevice("fuzzfs", os.path.join(top, "shared"))
        _state["kicks"] = eventfds(2)
    return _state["dev"], _state["top"]  # type: ignore[return-value]


def _field(inp: Input, code: str) -> int:
    size = struct.calcsize("<" + code)
    if code == "I" and inp.one_in(6):
        return inp.pick(_MODES)
    return inp.interesting_int(size)


def _body(inp: Input, opcode: int) -> bytes:
    s, names = OPS.get(opcode, (None, inp.u8() % 3))
    out = b""
    if s is not None:
        codes = [c for c in s.format.lstrip("<") if c.isalpha() and c != "x"]
        values = [_field(inp, c) for c in codes]
        if opcode == F.INIT and not inp.one_in(8):
            values[0] = F.KERNEL_VERSION
        out = s.pack(*values)
        if opcode == F.BATCH_FORGET:
            out += b"".join(F.FORGET_ONE.pack(inp.interesting_int(8), inp.interesting_int(8))
                            for _ in range(inp.u8() % 4))
    for _ in range(names):
        name = inp.pick(_NAMES) if not inp.one_in(8) else inp.blob(20)
        out += name + (b"" if inp.one_in(32) else b"\0")
    if opcode in (F.WRITE, F.SETXATTR):
        out += inp.blob(64)
    return out


def _request(inp: Input, first: bool) -> list[Part]:
    opcode = F.INIT if first and not inp.one_in(16) else inp.pick(_OPCODES + (0, 99, inp.u32()))
    body = _body(inp, opcode)
    length = F.IN_HEADER.size + len(body)
    if inp.one_in(16):
        length = inp.pick((0, F.IN_HEADER.size - 1, length + 1, inp.u32()))
    header = F.IN_HEADER.pack(length, opcode, inp.u64(), inp.pick((1, 1, 2, 3, 4, 5, inp.u64())),
                              inp.pick((0, 0, 1000, inp.u32())), inp.pick((0, 0, 1000, inp.u32())), inp.u32(), 0, 0)
    parts = [readable(header + body)]
    if inp.one_in(8):  # header and body in separate descriptors
        raw = parts[0].data
        parts = [readable(raw[:F.IN_HEADER.size]), readable(raw[F.IN_HEADER.size:] or b"\0")]
    parts.append(writable(inp.pick((F.OUT_HEADER.size + 4096, F.OUT_HEADER.size + 120, F.OUT_HEADER.size, 8,
                                    inp.u16()))))
    return parts


class _HandlerCrash(Exception):
    """A FUSE handler raised something that is not a clean error."""


def fuzz_one(data: bytes) -> None:
    inp = Input(data)
    dev, top = _setup()
    guest = HostileGuest(inp)
    hiprio = guest.queue(0, [_request(inp, False) for _ in range(inp.u8() % 2)])
    requests = guest.queue(1, [_request(inp, i == 0) for i in range(1 + inp.u8() % 8)])
    loop, irq = StepLoop(), RecordingInterrupt()
    crashes: list[BaseException] = []
    syncs: list[None] = []
    handle = FuseServer.handle

    def checked(self: FuseServer, req: Request, out: Writer) -> bytes | int:
        try:
            return handle(self, req, out)
        except (OSError, NoReply, OverflowError, GuestMemoryError):
            raise
        except Exception as e:
            crashes.append(e)
            raise

    try:
        with file_size_bound(1 << 20), mock.patch.object(os, "sync", lambda: syncs.append(None)), \
                mock.patch.object(FuseServer, "handle", checked):
            try:
                dev.activate(guest.mem, [hiprio, requests], _state["kicks"], irq, loop)  # type: ignore[arg-type]
            except DeviceError:
                return
            dev.reset()
    finally:
        loop.close()
        if dev.server is not None:
            dev.reset()
        after = _outside_state(top)
        _layout(top)
    assert after == _state["outside"], f"something outside the shared directory changed: {after}"
    if crashes:
        raise _HandlerCrash(f"FUSE handler raised {crashes[0]!r}") from crashes[0]
