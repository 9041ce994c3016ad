"""The agent's upcall server (katapy.agent.upcall) on a fake memory sysfs tree, spoken to over a socketpair."""
from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path

import pytest

from katapy.agent.upcall.memory import MemoryHotplugFailed, MemorySysfs
from katapy.agent.upcall.server import UpcallServer
from katapy.upcall import wire

BS = 128 << 20


class KernelLikeSysfs(MemorySysfs):
    """A tmp tree that acts as the kernel does: ``probe`` adds memoryN (offline); some blocks refuse to go offline."""

    def __init__(self, root: Path, busy: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__(root)
        root.mkdir(exist_ok=True)
        (root / "block_size_bytes").write_text(f"{BS:x}\n")
        (root / "probe").write_text("")
        self.busy = set(busy)
        self.writes: list[str] = []

    def probe(self, address: int) -> None:
        super().probe(address)
        self.writes.append(f"probe {address:#x}")
        d = self.root / f"memory{address // BS}"
        d.mkdir()
        (d / "state").write_text("offline\n")

    def set_state(self, index: int, state: str) -> None:
        if state == "offline" and index in self.busy:
            raise MemoryHotplugFailed(errno.EBUSY, f"memory{index}/state <- 'offline'")
        super().set_state(index, state)
        self.writes.append(f"memory{index} {state}")
        if state == "online_movable":
            (self.root / f"memory{index}" / "state").write_text("online\n")


def _serve(sysfs: MemorySysfs):
    a, b = socket.socketpair()
    server = UpcallServer(socket.socket(), memory=sysfs)
    t = threading.Thread(target=lambda: (server.serve_connection(a), a.close()), daemon=True)
    t.start()
    return b, t


def _call(conn: socket.socket, req: wire.Request) -> wire.Reply:
    conn.sendall(wire.encode_request(req))
    buf = b""
    while len(buf) < wire.MSG_SIZE:
        chunk = conn.recv(wire.MSG_SIZE - len(buf))
        assert chunk, "the server closed the connection"
        buf += chunk
    return wire.decode_reply(buf, req.type)


def _connect(conn: socket.socket) -> None:
    conn.sendall(wire.DEV_MGR_SERVICE)
    greeting = conn.recv(wire.MSG_SIZE, socket.MSG_WAITALL)
    assert wire.decode_reply(greeting, wire.MsgType.CONNECT).ok


def test_add_probes_and_onlines_movable_then_remove_offlines_highest_first(tmp_path):
    fs = KernelLikeSysfs(tmp_path / "memory")
    conn, t = _serve(fs)
    _connect(conn)
    base = 4 << 30
    assert _call(conn, wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest(base, 2 * BS))).ok
    assert fs.writes == [f"probe {base:#x}", "memory32 online_movable", f"probe {base + BS:#x}", "memory33 online_movable"]
    fs.writes.clear()
    assert _call(conn, wire.Request(wire.MsgType.DEL_MEM, wire.MemRequest(base, 2 * BS))).ok
    assert fs.writes == ["memory33 offline", "memory32 offline"]
    fs.writes.clear()
    # probed blocks stay known to the kernel: adding them again only onlines
    assert _call(conn, wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest(base, BS))).ok
    assert fs.writes == ["memory32 online_movable"]
    conn.close()
    t.join(5)
    assert not t.is_alive()


def test_a_block_that_will_not_offline_undoes_the_request(tmp_path):
    fs = KernelLikeSysfs(tmp_path / "memory", busy={32})
    conn, _ = _serve(fs)
    _connect(conn)
    base = 4 << 30
    assert _call(conn, wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest(base, 2 * BS))).ok
    fs.writes.clear()
    reply = _call(conn, wire.Request(wire.MsgType.DEL_MEM, wire.MemRequest(base, 2 * BS)))
    assert reply.ret == -errno.EBUSY
    assert fs.writes == ["memory33 offline", "memory33 online_movable"]  # put back as it was
    assert fs.state(33) == "online"


def test_misaligned_and_unsupported_requests_get_an_errno(tmp_path):
    conn, _ = _serve(KernelLikeSysfs(tmp_path / "memory"))
    _connect(conn)
    assert _call(conn, wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest((4 << 30) + 4096, BS))).ret == -errno.EINVAL
    assert _call(conn, wire.Request(wire.MsgType.ADD_MMIO, wire.MmioRequest(0xD000_0000, 0x1000, 5))).ret == \
        -errno.ENOTSUP
    no_hotplug = MemorySysfs(tmp_path / "absent")  # a kernel without memory hotplug
    conn2, _ = _serve(no_hotplug)
    _connect(conn2)
    assert _call(conn2, wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest(4 << 30, BS))).ret == -errno.ENOTSUP


@pytest.mark.parametrize("first", [b"x", b""])
def test_wrong_service_byte_or_none_closes_without_a_greeting(tmp_path, first):
    conn, t = _serve(KernelLikeSysfs(tmp_path / "memory"))
    if first:
        conn.sendall(first)
    else:
        conn.shutdown(socket.SHUT_WR)
    t.join(5)
    assert not t.is_alive() and conn.recv(wire.MSG_SIZE) == b""


def test_garbage_closes_the_connection(tmp_path):
    conn, t = _serve(KernelLikeSysfs(tmp_path / "memory"))
    _connect(conn)
    conn.sendall(b"\xff" * wire.MSG_SIZE)  # bad magic
    t.join(5)
    assert not t.is_alive() and conn.recv(wire.MSG_SIZE) == b""


def test_a_handler_that_raises_is_answered_eio(tmp_path):
    class Broken(KernelLikeSysfs):
        def block_size(self) -> int:
            raise RuntimeError("boom")

    conn, _ = _serve(Broken(tmp_path / "memory"))
    _connect(conn)
    assert _call(conn, wire.Request(wire.MsgType.ADD_MEM, wire.MemRequest(4 << 30, BS))).ret == -errno.EIO
    assert _call(conn, wire.Request(wire.MsgType.DEL_MEM, wire.MemRequest(4 << 30, BS))).ret == -errno.EIO
