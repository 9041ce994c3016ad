"""Target ``vhost_user``: the vhost-user back end's message parser and handler (katapy.vmm.virtio.vhost_user).

A :class:`VhostUserServer` serving a virtio-blk device is fed a sequence of
messages over a socketpair, exactly as QEMU's front end would send them:
headers (every request and unknown ones, version and NEED_REPLY flags, sizes
past the payload or the 4 KiB limit), payloads (features, vring numbers,
bases and addresses, memory tables with bad counts, sizes and offsets,
config accesses) and ancillary fds (memfds for SET_MEM_TABLE, eventfds for
the vring fds, too many or too few), then EOF.

Clean outcomes: a reply, a REPLY_ACK error, a disconnect (ProtocolError,
OSError, DeviceError, ValueError: what the server itself treats as the front
end's fault).  A crash is any other exception out of request handling, a
signal (SIGBUS from a region larger than its fd), or an fd leaked once the
front end is gone.
"""
from __future__ import annotations

import os
import socket
import struct
import tempfile
from unittest import mock

from fuzz.common import Input
from katapy.vmm.virtio.blk import BlockDevice
from katapy.vmm.virtio.device import DeviceError
from katapy.vmm.virtio.vhost_user import server as vu
from katapy.vmm.virtio.vhost_user.protocol import (
    F_PROTOCOL_FEATURES, FLAG_NEED_REPLY, HEADER, VERSION, ProtocolError, Request,
)

USER_BASE = 0x7F00_0000_0000  # where the front end claims to have mapped guest RAM
REGION = 1 << 20
_REQUESTS = tuple(int(r) for r in Request)
_CLEAN = (ProtocolError, DeviceError, ValueError, OSError)
_state: dict[str, object] = {}


def _server() -> vu.VhostUserServer:
    if "server" not in _state:
        d = tempfile.mkdtemp(prefix="katapy-fuzz-vu-")
        path = os.path.join(d, "disk.img")
        with open(path, "wb") as f:
            f.truncate(64 * 512)
        _state["server"] = vu.VhostUserServer(BlockDevice(path), os.path.join(d, "vu.sock"))
    return _state["server"]  # type: ignore[return-value]


def _memfd() -> int:
    fd = os.memfd_create("katapy-fuzz-vu", os.MFD_CLOEXEC)
    os.ftruncate(fd, REGION)
    return fd


def _payload(inp: Input, req: int, features: int) -> tuple[bytes, list[int]]:
    """The payload for ``req`` and the fds that ride with it."""
    fds: list[int] = []
    if req in (Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES):
        value = inp.pick((features | 1 << F_PROTOCOL_FEATURES, features, 0x3FFF, inp.u64()))
        return struct.pack("<Q", value), fds
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        no_fd = inp.one_in(6)
        nfds = (0 if no_fd else 1) if not inp.one_in(8) else inp.u8() % 3
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
        return struct.pack("<Q", inp.pick((0, 0, 1, 2, inp.u8())) | (0x100 if no_fd else 0)), fds
    if req in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_ENABLE):
        return struct.pack("<II", inp.pick((0, 0, 1, inp.u32())), inp.pick((16, 256, 1, 0, 3, 1 << 16, inp.u32()))), fds
    if req == Request.SET_VRING_ADDR:
        offs = [inp.pick((0x0, 0x1000, 0x2000, REGION - 2, REGION, inp.u32())) for _ in range(3)]
        return struct.pack("<IIQQQQ", inp.pick((0, 0, 1, inp.u32())), 0,
                           *(USER_BASE + o if not inp.one_in(8) else inp.u64() for o in offs), 0), fds
    if req == Request.SET_MEM_TABLE:
        n = 1 + inp.u8() % 2 if not inp.one_in(16) else inp.pick((0, 9, inp.u32()))
        regions = b""
        for i in range(min(n, 9)):
            gpa = inp.pick((i * REGION, i * REGION, 0, inp.u64()))
            size = inp.pick((REGION, REGION, REGION // 2, REGION * 2, 0, 1 << 52, inp.u64()))
            offset = inp.pick((0, 0, 4096, REGION, inp.u64()))
            regions += struct.pack("<QQQQ", gpa, size, USER_BASE + i * REGION, offset)
        nfds = min(n, 8) if not inp.one_in(8) else inp.u8() % 4
        fds = [_memfd() for _ in range(nfds)]
        return struct.pack("<II", n, 0) + regions, fds
    if req in (Request.GET_CONFIG, Request.SET_CONFIG):
        size = inp.pick((4, 8, 60, 256, 257, inp.u32()))
        return struct.pack("<III", inp.pick((0, 20, 96, 300, inp.u32())), size, 0) + inp.blob(64), fds
    if req == Request.SET_BACKEND_REQ_FD or inp.one_in(16):
        fds = [os.eventfd(0, os.EFD_CLOEXEC)]
    return inp.blob(48), fds


def _send(sock: socket.socket, header: bytes, payload: bytes, fds: list[int]) -> None:
    try:
        if fds:
            sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            sock.sendall(header)
        sock.sendall(payload)
    finally:
        for fd in fds:
            os.close(fd)  # the receiver has its own copies now


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fuzz_one(data: bytes) -> None:
    inp = Input(data)
    srv = _server()
    features = srv.device.avail_features()
    before = _open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.settimeout(1.0)
    theirs.setblocking(False)
    try:
        for _ in range(1 + inp.u8() % 8):
            req = inp.pick(_REQUESTS + (0, 99, inp.u32()))
            payload, fds = _payload(inp, req, features)
            flags = inp.pick((VERSION, VERSION, VERSION | FLAG_NEED_REPLY, inp.u32()))
            size = len(payload) if not inp.one_in(16) else inp.pick((len(payload) + 1, 4097, inp.u32()))
            _send(theirs, HEADER.pack(req & 0xFFFFFFFF, flags & 0xFFFFFFFF, size & 0xFFFFFFFF), payload, fds)
        theirs.shutdown(socket.SHUT_WR)
        srv._conn = ours
        unexpected: list[BaseException] = []
        dispatch = srv._dispatch

        def checked(msg):  # type: ignore[no-untyped-def]
            try:
                return dispatch(msg)
            except _CLEAN:
                raise
            except Exception as e:
                unexpected.append(e)
                raise

        with mock.patch.object(srv, "_dispatch", checked):
            for _ in range(64):
                if srv._conn is None:
                    break
                srv._on_message(ours.fileno(), 1)
                try:
                    while theirs.recv(65536):  # replies the front end would read
                        pass
                except OSError:  # nothing to read yet (EAGAIN), or the server hung up
                    pass
        assert srv._conn is None, "the server kept a connection whose front end sent EOF"
        if unexpected:
            raise AssertionError(f"vhost-user request raised {unexpected[0]!r}") from unexpected[0]
    finally:
        if srv._conn is not None:
            srv._disconnect("fuzz case over")
        ours.close()
        theirs.close()
    after = _open_fds()
    assert after <= before, f"{after - before} fds leaked by the vhost-user back end"
