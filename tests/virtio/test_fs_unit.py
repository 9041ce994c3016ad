"""virtio-fs without a guest: hand-built FUSE requests through real rings (tests/virtio/driver.py)."""
from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory
from katapy.vmm.virtio.device import EventFdInterrupt, VIRTIO_F_VERSION_1
from katapy.vmm.virtio.fs import FsDevice
from katapy.vmm.virtio.fs import fuse as F

from .driver import DriverQueue


class FsHarness:
    def __init__(self, shared):
        self.mem = GuestMemory.create([(0, 4 << 20)])
        self.dev = FsDevice("t", shared)
        self.dev.ack_features(1 << VIRTIO_F_VERSION_1)
        self.hip = DriverQueue(self.mem, 0x1000, 0x100000, 0x80000, size=16)
        self.req = DriverQueue(self.mem, 0x10000, 0x200000, 0x100000, size=16)
        self.loop = EventLoop()  # not started: the test drives the device synchronously
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
        self.calls = {0: os.eventfd(0, os.EFD_NONBLOCK), 1: os.eventfd(0, os.EFD_NONBLOCK)}
        self.dev.activate(self.mem, [self.hip.state(), self.req.state()], self.kicks,
                          EventFdInterrupt(self.calls), self.loop)
        self.unique = 0

    def call(self, opcode: int, nodeid: int, body: bytes, out_size: int = 4096, raw: bytes | None = None):
        self.unique += 1
        hdr = raw if raw is not None else F.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0)
        self.req.add_chain([(hdr + body, False), (out_size, True)])
        self.dev._process(1)
        (head, length, data), = self.req.take_used()
        if length == 0:
            return None, b""
        ln, err, uniq = F.OUT_HEADER.unpack(data[:16])
        assert ln == length and uniq == (self.unique if raw is None else uniq)
        return err, data[16:length]

    def close(self):
        self.dev.close()
        self.loop.close()
        for fd in self.kicks + list(self.calls.values()):
            os.close(fd)
        self.mem.close()


@pytest.fixture
def h(tmp_path):
    (tmp_path / "share").mkdir()
    (tmp_path / "outside").write_text("secret")
    hs = FsHarness(tmp_path / "share")
    err, _ = hs.call(F.INIT, 0, F.INIT_IN.pack(7, 38, 0, 0) + bytes(48))
    assert err == 0
    yield hs
    hs.close()


def lookup(h, parent, name: bytes):
    return h.call(F.LOOKUP, parent, name + b"\0")


def test_lookup_refuses_dotdot_and_slashes(h):
    assert lookup(h, 1, b"..")[0] == -errno.EINVAL
    assert lookup(h, 1, b"../outside")[0] == -errno.EINVAL
    assert lookup(h, 1, b"nope")[0] == -errno.ENOENT
    assert lookup(h, 12345, b"x")[0] == -errno.ESTALE


def test_symlink_target_is_data(h, tmp_path):
    err, body = h.call(F.SYMLINK, 1, b"esc\0../outside\0")
    assert err == 0
    nodeid = struct.unpack_from("<Q", body)[0]
    err, body = h.call(F.READLINK, nodeid, b"")
    assert (err, body) == (0, b"../outside")
    assert h.call(F.OPEN, nodeid, F.OPEN_IN.pack(os.O_RDONLY, 0))[0] == -errno.ELOOP


def test_unknown_opcode_is_enosys(h):
    assert h.call(999, 1, b"")[0] == -errno.ENOSYS


def test_short_bodies_are_einval(h):
    assert h.call(F.READ, 1, b"\x01")[0] == -errno.EINVAL
    assert h.call(F.LOOKUP, 1, b"unterminated")[0] == -errno.EINVAL


def test_create_write_read_roundtrip(h, tmp_path):
    err, body = h.call(F.CREATE, 1, F.CREATE_IN.pack(os.O_RDWR, 0o644, 0o022, 0) + b"f\0")
    assert err == 0
    fh = struct.unpack_from("<Q", body, F.ENTRY_OUT_HEAD.size + F.ATTR.size)[0]
    err, body = h.call(F.WRITE, 2, F.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0) + b"hello")
    assert (err, struct.unpack("<II", body)[0]) == (0, 5)
    assert (tmp_path / "share" / "f").read_bytes() == b"hello"
    err, body = h.call(F.READ, 2, F.READ_IN.pack(fh, 1, 100, 0, 0, 0, 0))
    assert (err, body) == (0, b"ello")
    # a write claiming more data than it carries
    assert h.call(F.WRITE, 2, F.WRITE_IN.pack(fh, 0, 500, 0, 0, 0, 0) + b"x")[0] == -errno.EINVAL
    assert h.call(F.READ, 2, F.READ_IN.pack(fh + 99, 0, 10, 0, 0, 0, 0))[0] == -errno.EBADF


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.integers(0, 60), nodeid=st.sampled_from([0, 1, 2, 3, 2**64 - 1]),
       body=st.binary(max_size=200), out_size=st.sampled_from([0, 8, 16, 64, 4096]))
def test_fuzz_requests_never_escape(h, opcode, nodeid, body, out_size):
    if opcode == F.DESTROY:
        return
    h.call(opcode, nodeid, body, out_size=out_size)
    assert not h.dev.broken


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(min_size=0, max_size=60))
def test_fuzz_garbage_headers(h, raw):
    h.unique += 1
    h.req.add_chain([(raw or b"\0", False), (64, True)])
    h.dev._process(1)
    h.req.take_used()
    assert not h.dev.broken


def _call_unblocking_fifo(h, fifo, *call_args):
    """h.call(*call_args) in a thread; if it is stuck in open(2) on ``fifo``, open the write end to free it.

    Returns (error, stuck): the device must answer at once, never wait for a FIFO's other end."""
    import threading

    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", h.call(*call_args)), daemon=True)
    t.start()
    t.join(2)
    stuck = t.is_alive()
    if stuck:
        fd = os.open(fifo, os.O_WRONLY)  # lets the device's open(O_RDONLY) return
        t.join(5)
        os.close(fd)
    return out["r"][0], stuck


def test_open_of_a_fifo_fails_at_once(h, tmp_path):
    """OPEN of a FIFO would block the device event loop in open(2) until a writer came (a guest
    hang of every device on the loop). A Linux guest opens FIFOs, sockets and device nodes itself
    and never sends FUSE_OPEN for them; the server opens regular files and directories only."""
    fifo = tmp_path / "share" / "p"
    os.mkfifo(fifo)
    nodeid = struct.unpack_from("<Q", lookup(h, 1, b"p")[1])[0]
    err, stuck = _call_unblocking_fifo(h, fifo, F.OPEN, nodeid, F.OPEN_IN.pack(os.O_RDONLY, 0))
    assert not stuck, "OPEN of a FIFO blocked the device loop"
    assert err == -errno.EPERM


def test_create_over_an_existing_fifo_fails_at_once(h, tmp_path):
    fifo = tmp_path / "share" / "p"
    os.mkfifo(fifo)
    err, stuck = _call_unblocking_fifo(h, fifo, F.CREATE, 1, F.CREATE_IN.pack(os.O_RDONLY, 0o644, 0, 0) + b"p\0")
    assert not stuck, "CREATE over an existing FIFO blocked the device loop"
    assert err == -errno.EPERM
    # O_EXCL still fails with EEXIST; an existing regular file is still opened (and truncated)
    assert h.call(F.CREATE, 1, F.CREATE_IN.pack(os.O_RDWR | os.O_EXCL, 0o644, 0, 0) + b"p\0")[0] == -errno.EEXIST
    (tmp_path / "share" / "f").write_bytes(b"old")
    err, body = h.call(F.CREATE, 1, F.CREATE_IN.pack(os.O_RDWR | os.O_TRUNC, 0o644, 0, 0) + b"f\0")
    assert err == 0 and (tmp_path / "share" / "f").read_bytes() == b""
    fh = struct.unpack_from("<Q", body, F.ENTRY_OUT_HEAD.size + F.ATTR.size)[0]
    assert h.call(F.WRITE, 2, F.WRITE_IN.pack(fh, 0, 3, 0, 0, 0, 0) + b"new")[0] == 0
    assert (tmp_path / "share" / "f").read_bytes() == b"new"
    # a symlink in the way is not followed
    os.symlink("../outside", tmp_path / "share" / "l")
    assert h.call(F.CREATE, 1, F.CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + b"l\0")[0] == -errno.ELOOP
    assert (tmp_path / "outside").read_text() == "secret"


def test_device_node_made_by_the_guest_is_never_opened_on_the_host(h, tmp_path):
    """MKNOD of a character device (here /dev/zero's 1:5) puts a node in the share; the guest's own
    kernel gives it meaning. The host must never open it: that would hand the guest a host device."""
    import stat as st_

    err, body = h.call(F.MKNOD, 1, F.MKNOD_IN.pack(st_.S_IFCHR | 0o666, os.makedev(1, 5), 0, 0) + b"zero\0")
    if err == -errno.EPERM:
        pytest.skip("this test process may not mknod a character device (no CAP_MKNOD)")
    assert err == 0
    nodeid = struct.unpack_from("<Q", body)[0]
    assert h.call(F.OPEN, nodeid, F.OPEN_IN.pack(os.O_RDONLY, 0))[0] == -errno.EPERM
    err, _ = h.call(F.CREATE, 1, F.CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + b"zero\0")
    assert err == -errno.EPERM


def _hdr(h, length: int, opcode: int, nodeid: int) -> bytes:
    return F.IN_HEADER.pack(length, opcode, h.unique + 1, nodeid, 0, 0, 1, 0, 0)


def test_in_header_len_must_match_the_chain(h, tmp_path):
    """fuse_in_header.len is the request's whole length (header + arguments); a request claiming more
    than its chain carries, or less than a header, is EINVAL, and nothing past len is read as part of it."""
    name = b"f\0"
    (tmp_path / "share" / "f").write_bytes(b"")
    assert h.call(F.LOOKUP, 1, name, raw=_hdr(h, 40 + len(name) + 1, F.LOOKUP, 1))[0] == -errno.EINVAL
    assert h.call(F.LOOKUP, 1, name, raw=_hdr(h, 39, F.LOOKUP, 1))[0] == -errno.EINVAL
    assert h.call(F.LOOKUP, 1, name, raw=_hdr(h, 2**32 - 1, F.LOOKUP, 1))[0] == -errno.EINVAL
    # the name's NUL lies past len: the name is unterminated within the request
    assert h.call(F.LOOKUP, 1, name, raw=_hdr(h, 40 + 1, F.LOOKUP, 1))[0] == -errno.EINVAL
    assert h.call(F.LOOKUP, 1, name, raw=_hdr(h, 40 + len(name), F.LOOKUP, 1))[0] == 0
    # WRITE data beyond len is not the request's: size 5 with len covering 3 data bytes
    err, body = h.call(F.OPEN, 2, F.OPEN_IN.pack(os.O_RDWR, 0))
    fh = struct.unpack_from("<Q", body)[0]
    args = F.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0) + b"hello"
    assert h.call(F.WRITE, 2, args, raw=_hdr(h, 40 + len(args) - 2, F.WRITE, 2))[0] == -errno.EINVAL
    assert (tmp_path / "share" / "f").read_bytes() == b""
    assert h.call(F.WRITE, 2, args)[0] == 0 and (tmp_path / "share" / "f").read_bytes() == b"hello"


def test_directory_released_with_release_keeps_no_listing(h, tmp_path):
    """A directory handle closed with RELEASE instead of RELEASEDIR drops its listing snapshot too:
    otherwise opendir/readdir/release over a big directory grows host memory with every round."""
    for i in range(50):
        (tmp_path / "share" / f"f{i}").write_bytes(b"")
    for _ in range(3):
        err, body = h.call(F.OPENDIR, 1, F.OPEN_IN.pack(os.O_RDONLY, 0))
        fh = struct.unpack_from("<Q", body)[0]
        assert h.call(F.READDIR, 1, F.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))[0] == 0
        assert h.call(F.RELEASE, 1, F.RELEASE_IN.pack(fh, 0, 0, 0))[0] == 0
        assert h.call(F.READDIR, 1, F.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))[0] == -errno.EBADF
    assert h.dev.server._dirs == {}


def test_offsets_beyond_the_host_off_t_are_einval(h, tmp_path):
    """u64 offsets and sizes from the guest that no host file offset can hold are EINVAL, not a
    handler crash (EIO with a traceback in the log)."""
    (tmp_path / "share" / "f").write_bytes(b"data")
    nodeid = struct.unpack_from("<Q", lookup(h, 1, b"f")[1])[0]
    fh = struct.unpack_from("<Q", h.call(F.OPEN, nodeid, F.OPEN_IN.pack(os.O_RDWR, 0))[1])[0]
    assert h.call(F.READ, nodeid, F.READ_IN.pack(fh, 2**64 - 1, 10, 0, 0, 0, 0))[0] == -errno.EINVAL
    assert h.call(F.WRITE, nodeid, F.WRITE_IN.pack(fh, 2**63, 1, 0, 0, 0, 0) + b"x")[0] == -errno.EINVAL
    setattr_in = F.SETATTR_IN.pack(F.FATTR_SIZE, 0, 0, 2**64 - 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert h.call(F.SETATTR, nodeid, setattr_in)[0] == -errno.EINVAL
    assert (tmp_path / "share" / "f").read_bytes() == b"data"


def test_guest_cannot_set_file_capabilities_or_trusted_xattrs_on_the_host(h, tmp_path):
    """A file in a shared directory must not gain, on the host, privileges the guest gave it: the guest may
    not write security.capability nor anything in trusted.* (CAP_SYS_ADMIN's, where overlayfs keeps its layer
    metadata), and may not read or list trusted.* either; user.* round-trips."""
    err, body = h.call(F.CREATE, 1, F.CREATE_IN.pack(os.O_RDWR, 0o755, 0o022, 0) + b"tool\0")
    assert err == 0
    node = struct.unpack_from("<Q", body)[0]
    host = tmp_path / "share" / "tool"
    caps = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")  # v2, cap_net_raw permitted
    os.setxattr(host, "trusted.katapy-test", b"host")  # the host's own trusted xattr

    def setx(name: bytes, value: bytes) -> int:
        return h.call(F.SETXATTR, node, F.SETXATTR_IN.pack(len(value), 0) + name + b"\0" + value)[0]

    assert setx(b"security.capability", caps) == -errno.EPERM
    assert setx(b"trusted.overlay.opaque", b"y") == -errno.EPERM
    assert h.call(F.REMOVEXATTR, node, b"trusted.katapy-test\0")[0] == -errno.EPERM
    assert h.call(F.GETXATTR, node, F.GETXATTR_IN.pack(64, 0) + b"trusted.katapy-test\0")[0] == -errno.ENODATA
    assert "security.capability" not in os.listxattr(host)
    assert os.getxattr(host, "trusted.katapy-test") == b"host"
    err, names = h.call(F.LISTXATTR, node, F.GETXATTR_IN.pack(4096, 0))
    assert err == 0 and b"trusted." not in names
    assert setx(b"user.note", b"kept") == 0
    err, value = h.call(F.GETXATTR, node, F.GETXATTR_IN.pack(64, 0) + b"user.note\0")
    assert (err, value) == (0, b"kept")
