"""The agent's upcall server (katapy.agent.upcall) against a fake kernel tree, spoken to over AF_UNIX.

The fake kernel (:class:`FakeKernel`) is a tmp directory with the files a
stock kernel exports and a ``write`` that does what the kernel does on each
store (Documentation/admin-guide/mm/memory-hotplug.rst, core-api/cpu_hotplug.rst,
drivers/base/bus.c ``bind_store``/``unbind_store``):

* ``memory/probe`` adds ``memory<N>`` (offline); probing a block that exists is EEXIST;
* ``memory<N>/state``: ``online_movable``/``online`` and ``offline``; storing
  the state a block already has is EINVAL (``device_online`` returns 1);
  blocks in ``busy`` refuse ``offline`` with EBUSY, blocks in ``unmovable``
  refuse ``online_movable`` with EINVAL;
* ``cpu<N>/online`` takes ``1``/``0``; CPUs in ``cpu_refuse`` fail with EIO;
* ``drivers/virtio-mmio/bind`` binds a device the VMM populated (``populated``):
  the driver's link appears; other devices stay unbound (the probe declined
  DeviceID 0; ``bind`` then fails with ENODEV); ``unbind`` of a device the
  driver does not have is ENODEV.

An abstract AF_UNIX listener stands in for the vsock one; the client side of
each test speaks the wire format with ``katapy.upcall.wire``.
"""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from katapy.agent.upcall import server as upcall_server
from katapy.agent.upcall.handlers import DeviceManager
from katapy.agent.upcall.mmio import MmioSlot, parse_device_param, parse_iomem
from katapy.agent.upcall.server import UpcallServer
from katapy.agent.upcall.sysfs import Sysfs
from katapy.upcall import wire
from katapy.upcall.wire import CpuRequest, MemRequest, MmioRequest, MsgType, Request

BS = 128 << 20
BASE = 4 << 30  # memory block 32
MEM = "sys/devices/system/memory"
CPU = "sys/devices/system/cpu"
DRV = "sys/bus/platform/drivers/virtio-mmio"
MMIO_PARAM = "sys/module/virtio_mmio/parameters/device"
# two placeholder slots, as the VMM declares them (virtio_mmio.device=4K@0xd0000000:5 4K@0xd0001000:6)
PARAM_TEXT = "0x1000@0xd0000000:5:0\n0x1000@0xd0001000:6:1\n"
IOMEM_TEXT = """00000000-00000fff : Reserved
00100000-bfffffff : System RAM
  01000000-01ffffff : Kernel code
d0000000-d0000fff : virtio-mmio.0
  d0000000-d0000fff : virtio-mmio
d0001000-d0001fff : virtio-mmio.1
fee00000-fee00fff : Local APIC
"""


def _oserror(err: int, path: Path) -> OSError:
    return OSError(err, os.strerror(err), str(path))


class FakeKernel(Sysfs):
    """A tmp tree with the kernel's files, whose stores act like the kernel's (module docstring)."""

    def __init__(self, root: Path, *, blocks: dict[int, str] | None = None, busy: tuple[int, ...] = (),
                 unmovable: tuple[int, ...] = (), cpus: int = 4, cpus_online: tuple[int, ...] = (0,),
                 cpu_refuse: tuple[int, ...] = (), mmio_param: str | None = PARAM_TEXT,
                 iomem: str = IOMEM_TEXT, populated: tuple[str, ...] = ("virtio-mmio.1",),
                 bound: tuple[str, ...] = (), memory_hotplug: bool = True) -> None:
        super().__init__(root)
        self.busy, self.unmovable, self.cpu_refuse = set(busy), set(unmovable), set(cpu_refuse)
        self.populated = set(populated)
        self.writes: list[tuple[str, str]] = []
        mem = root / MEM
        mem.mkdir(parents=True)
        if memory_hotplug:
            (mem / "block_size_bytes").write_text(f"{BS:x}\n")
            (mem / "probe").write_text("")
        for n, state in (blocks or {}).items():
            self._add_block(n, state)
        cpu = root / CPU
        cpu.mkdir(parents=True)
        (cpu / "present").write_text(f"0-{cpus - 1}\n")
        for n in range(cpus):
            (cpu / f"cpu{n}").mkdir()
            if n:  # no online file for CPU 0, as on x86
                (cpu / f"cpu{n}" / "online").write_text("1\n" if n in cpus_online else "0\n")
        drv = root / DRV
        drv.mkdir(parents=True)
        (drv / "bind").write_text("")
        (drv / "unbind").write_text("")
        devices = root / "sys/devices/platform"
        devices.mkdir(parents=True)
        for name in ("virtio-mmio.0", "virtio-mmio.1"):
            (devices / name).mkdir()
        for name in bound:
            (drv / name).symlink_to(devices / name)
        if mmio_param is not None:
            (root / MMIO_PARAM).parent.mkdir(parents=True)
            (root / MMIO_PARAM).write_text(mmio_param)
        (root / "proc").mkdir()
        (root / "proc/iomem").write_text(iomem)

    def _add_block(self, n: int, state: str) -> None:
        d = self.root / MEM / f"memory{n}"
        d.mkdir()
        (d / "state").write_text(state + "\n")

    def block_state(self, n: int) -> str:
        return (self.root / MEM / f"memory{n}" / "state").read_text().strip()

    def cpu_online(self, n: int) -> bool:
        f = self.root / CPU / f"cpu{n}" / "online"
        return not f.exists() or f.read_text().strip() == "1"

    def write(self, path: Path, text: str) -> None:
        rel = path.relative_to(self.root)
        parts = rel.parts
        self.writes.append((str(rel), text))  # every store tried, accepted or refused
        if not path.exists():  # the kernel has no such attribute
            raise _oserror(errno.ENOENT, path)
        if str(rel) == f"{MEM}/probe":
            n = int(text, 0) // BS
            if (self.root / MEM / f"memory{n}").exists():
                raise _oserror(errno.EEXIST, path)
            self._add_block(n, "offline")
        elif str(rel.parent.parent) == MEM and parts[-1] == "state":
            n = int(parts[-2].removeprefix("memory"))
            current, online = self.block_state(n), text != "offline"
            if (current == "online") == online:
                raise _oserror(errno.EINVAL, path)
            if not online and n in self.busy:
                raise _oserror(errno.EBUSY, path)
            if text == "online_movable" and n in self.unmovable:
                raise _oserror(errno.EINVAL, path)
            if text not in ("online", "online_movable", "offline"):
                raise _oserror(errno.EINVAL, path)
            path.write_text("online\n" if online else "offline\n")
        elif str(rel.parent.parent) == CPU and parts[-1] == "online":
            n = int(parts[-2].removeprefix("cpu"))
            if n in self.cpu_refuse:
                raise _oserror(errno.EIO, path)
            path.write_text(text + "\n")
        elif str(rel) == f"{DRV}/bind":
            link = self.root / DRV / text
            if link.exists():
                raise _oserror(errno.EBUSY, path)
            if text not in self.populated:
                raise _oserror(errno.ENODEV, path)
            link.symlink_to(self.root / "sys/devices/platform" / text)
        elif str(rel) == f"{DRV}/unbind":
            link = self.root / DRV / text
            if not link.is_symlink():
                raise _oserror(errno.ENODEV, path)
            link.unlink()
        else:
            raise AssertionError(f"unexpected store {text!r} to {rel}")

    def stores(self, prefix: str = "") -> list[tuple[str, str]]:
        """The stores tried so far, paths shortened: ``("memory32/state", "online_movable")``."""
        out = []
        for rel, text in self.writes:
            short = rel.removeprefix(MEM + "/").removeprefix(CPU + "/").removeprefix(DRV + "/")
            if short.startswith(prefix):
                out.append((short, text))
        return out


class Client:
    """The VMM's side of one connection."""

    def __init__(self, address: bytes | str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(address)

    def recv_all(self, size: int) -> bytes:
        buf = b""
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    def handshake(self) -> bytes:
        self.sock.sendall(wire.DEV_MGR_SERVICE)
        return self.recv_all(wire.MSG_SIZE)

    def call(self, req: Request) -> wire.Reply:
        self.sock.sendall(wire.encode_request(req))
        buf = self.recv_all(wire.MSG_SIZE)
        assert len(buf) == wire.MSG_SIZE, f"the server closed the connection ({len(buf)} bytes)"
        return wire.decode_reply(buf, req.type)

    def closed_by_server(self) -> bool:
        """True if the server closed the connection (EOF, or a reset) without sending anything."""
        try:
            return self.sock.recv(wire.MSG_SIZE) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class Served:
    """An UpcallServer on an abstract AF_UNIX listener, serving from its thread."""

    def __init__(self, handler: Callable[[Request], wire.Reply]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("")  # Linux autobind: an abstract address
        self.listener.listen(4)
        self.address = self.listener.getsockname()
        self.server = UpcallServer(self.listener, handler)
        self.thread = self.server.start()
        self.clients: list[Client] = []

    def connect(self, handshake: bool = True) -> Client:
        c = Client(self.address)
        self.clients.append(c)
        if handshake:
            greeting = c.handshake()
            assert wire.decode_reply(greeting, MsgType.CONNECT).ok
        return c

    def close(self) -> None:
        self.server.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the accept loop did not stop"
        for c in self.clients:
            c.close()
        self.listener.close()


@pytest.fixture
def serve() -> Iterator:
    started: list[Served] = []

    def start(handler) -> Served:  # type: ignore[no-untyped-def]
        s = Served(handler)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def _kernel(tmp_path: Path, **kw) -> FakeKernel:  # type: ignore[no-untyped-def]
    return FakeKernel(tmp_path / "root", **kw)


def _dm(kernel: FakeKernel) -> DeviceManager:
    return DeviceManager(kernel)


def _mem(t: MsgType, base: int, size: int) -> Request:
    return Request(t, MemRequest(base, size))


# --- channel ----------------------------------------------------------------------------------------------

def test_the_greeting_is_a_connect_message_of_exactly_0x400_bytes(tmp_path, serve):
    s = serve(_dm(_kernel(tmp_path)))
    c = s.connect(handshake=False)
    greeting = c.handshake()
    assert len(greeting) == wire.MSG_SIZE
    assert greeting == wire.connect_greeting()


def test_the_port_constant_matches_the_wire_format():
    assert upcall_server.UPCALL_PORT == wire.UPCALL_PORT == 0xDB


@pytest.mark.parametrize("first", [b"x", b"D"])
def test_a_wrong_service_byte_closes_without_a_greeting(tmp_path, serve, first):
    s = serve(_dm(_kernel(tmp_path)))
    c = s.connect(handshake=False)
    c.sock.sendall(first)
    assert c.closed_by_server()
    assert s.connect().call(_mem(MsgType.ADD_MEM, BASE, BS)).ok  # the listener still serves


def test_garbage_closes_the_connection_and_the_server_accepts_the_next(tmp_path, serve):
    kernel = _kernel(tmp_path)
    s = serve(_dm(kernel))
    c = s.connect()
    bad = bytearray(wire.encode_request(_mem(MsgType.ADD_MEM, BASE, BS)))
    bad[0] ^= 0xFF  # bad magic
    c.sock.sendall(bytes(bad))
    assert c.closed_by_server()
    assert kernel.writes == []  # nothing acted on
    c2 = s.connect()
    assert c2.call(_mem(MsgType.ADD_MEM, BASE, BS)).ok
    assert kernel.block_state(32) == "online"


@pytest.mark.parametrize("message", [
    wire.connect_greeting(),  # CONNECT after the greeting
    wire.HEADER.pack(wire.MAGIC_VERSION, 4, int(MsgType.ADD_PCI), 0).ljust(wire.MSG_SIZE, b"\0"),  # not served
    wire.HEADER.pack(wire.MAGIC_VERSION, 8, int(MsgType.ADD_MEM), 0).ljust(wire.MSG_SIZE, b"\0"),  # wrong size
], ids=["connect", "pci", "short-payload"])
def test_requests_the_format_forbids_close_the_connection(tmp_path, serve, message):
    s = serve(_dm(_kernel(tmp_path)))
    c = s.connect()
    c.sock.sendall(message)
    assert c.closed_by_server()


def test_a_half_message_then_eof_ends_the_connection_quietly(tmp_path, serve):
    s = serve(_dm(_kernel(tmp_path)))
    c = s.connect()
    c.sock.sendall(wire.encode_request(_mem(MsgType.ADD_MEM, BASE, BS))[:100])
    c.sock.shutdown(socket.SHUT_WR)
    assert c.closed_by_server()
    assert s.connect().call(_mem(MsgType.ADD_MEM, BASE, BS)).ok


def test_a_new_connection_replaces_the_old_one(tmp_path, serve):
    s = serve(_dm(_kernel(tmp_path)))
    old = s.connect()
    new = s.connect()
    assert old.closed_by_server()
    assert new.call(_mem(MsgType.ADD_MEM, BASE, BS)).ok


def test_a_handler_that_raises_is_answered_eio_and_the_connection_stays(tmp_path, serve):
    calls = []

    def handler(req: Request) -> wire.Reply:
        calls.append(req.type)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return wire.Reply(req.type, 0)

    s = serve(handler)
    c = s.connect()
    assert c.call(_mem(MsgType.ADD_MEM, BASE, BS)).ret == -errno.EIO
    assert c.call(_mem(MsgType.DEL_MEM, BASE, BS)).ret == 0
    assert calls == [MsgType.ADD_MEM, MsgType.DEL_MEM]


def test_a_reply_that_cannot_be_sent_is_answered_eio(tmp_path, serve):
    s = serve(lambda req: wire.Reply(req.type, 5))  # a positive ret is not on the wire
    c = s.connect()
    assert c.call(_mem(MsgType.ADD_MEM, BASE, BS)).ret == -errno.EIO


def test_starting_the_server_does_not_import_the_wire_format():
    code = ("import sys, socket; from katapy.agent.upcall.server import UpcallServer; "
            "l = socket.socket(socket.AF_UNIX); l.bind(''); l.listen(); UpcallServer(l).start(); "
            "print(sorted(m for m in sys.modules if m.startswith('katapy')))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    loaded = eval(out)  # noqa: S307 - our own print of a list of names
    assert "katapy.agent.upcall.server" in loaded
    assert not [m for m in loaded if m.startswith("katapy.upcall") or m.endswith(("memory", "mmio", "cpu"))]


# --- memory -----------------------------------------------------------------------------------------------

def test_add_mem_probes_missing_blocks_and_onlines_them_movable(tmp_path, serve):
    # block 32 probed earlier and offline (a former DEL_MEM), 33 unknown, 34 already online
    kernel = _kernel(tmp_path, blocks={32: "offline", 34: "online"})
    c = serve(_dm(kernel)).connect()
    assert c.call(_mem(MsgType.ADD_MEM, BASE, 3 * BS)).ok
    assert kernel.stores() == [("memory32/state", "online_movable"), ("probe", f"{BASE + BS:#x}"),
                               ("memory33/state", "online_movable")]
    assert [kernel.block_state(n) for n in (32, 33, 34)] == ["online"] * 3


def test_del_mem_offlines_highest_first_and_blocks_stay_probed(tmp_path, serve):
    kernel = _kernel(tmp_path)
    c = serve(_dm(kernel)).connect()
    assert c.call(_mem(MsgType.ADD_MEM, BASE, 2 * BS)).ok
    kernel.writes.clear()
    assert c.call(_mem(MsgType.DEL_MEM, BASE, 2 * BS)).ok
    assert kernel.stores() == [("memory33/state", "offline"), ("memory32/state", "offline")]
    kernel.writes.clear()
    assert c.call(_mem(MsgType.ADD_MEM, BASE, 2 * BS)).ok  # no probe this time: no unprobe on a stock kernel
    assert kernel.stores() == [("memory32/state", "online_movable"), ("memory33/state", "online_movable")]


@pytest.mark.parametrize("base,size", [(BASE + 4096, BS), (BASE, BS + 4096), (BASE, 0)])
def test_misaligned_memory_is_einval_and_touches_nothing(tmp_path, serve, base, size):
    kernel = _kernel(tmp_path)
    c = serve(_dm(kernel)).connect()
    assert c.call(_mem(MsgType.ADD_MEM, base, size)).ret == -errno.EINVAL
    assert c.call(_mem(MsgType.DEL_MEM, base, size)).ret == -errno.EINVAL
    assert kernel.writes == []


def test_a_block_that_will_not_offline_reonlines_the_others(tmp_path, serve):
    kernel = _kernel(tmp_path, blocks={32: "online", 33: "online", 34: "online"}, busy=(33,))
    c = serve(_dm(kernel)).connect()
    assert c.call(_mem(MsgType.DEL_MEM, BASE, 3 * BS)).ret == -errno.EBUSY
    assert kernel.stores() == [("memory34/state", "offline"), ("memory33/state", "offline"),  # EBUSY
                               ("memory34/state", "online_movable")]
    assert [kernel.block_state(n) for n in (32, 33, 34)] == ["online"] * 3


def test_a_block_that_will_not_online_offlines_what_the_request_onlined(tmp_path, serve):
    kernel = _kernel(tmp_path, blocks={33: "online"}, unmovable=(34,))
    c = serve(_dm(kernel)).connect()
    assert c.call(_mem(MsgType.ADD_MEM, BASE, 3 * BS)).ret == -errno.EINVAL
    assert kernel.block_state(32) == "offline"  # onlined by this request, undone
    assert kernel.block_state(33) == "online"  # online before: left alone
    assert kernel.block_state(34) == "offline"


def test_a_kernel_without_memory_hotplug_is_eopnotsupp(tmp_path, serve):
    c = serve(_dm(_kernel(tmp_path, memory_hotplug=False))).connect()
    assert c.call(_mem(MsgType.ADD_MEM, BASE, BS)).ret == -errno.EOPNOTSUPP


# --- virtio-mmio ------------------------------------------------------------------------------------------

def _mmio(t: MsgType, base: int, irq: int, size: int = 0x1000) -> Request:
    return Request(t, MmioRequest(base, size, irq))


@pytest.mark.parametrize("param", [PARAM_TEXT, None], ids=["module-parameter", "proc-iomem"])
def test_add_mmio_binds_the_device_at_base(tmp_path, serve, param):
    kernel = _kernel(tmp_path, mmio_param=param)
    c = serve(_dm(kernel)).connect()
    assert c.call(_mmio(MsgType.ADD_MMIO, 0xD000_1000, 6)).ok
    assert kernel.stores() == [("bind", "virtio-mmio.1")]
    assert (kernel.root / DRV / "virtio-mmio.1").is_symlink()
    kernel.writes.clear()
    assert c.call(_mmio(MsgType.ADD_MMIO, 0xD000_1000, 6)).ok  # already bound: done, no store
    assert kernel.writes == []


def test_del_mmio_unbinds_and_an_unbound_device_is_done(tmp_path, serve):
    kernel = _kernel(tmp_path, bound=("virtio-mmio.1",))
    c = serve(_dm(kernel)).connect()
    assert c.call(_mmio(MsgType.DEL_MMIO, 0xD000_1000, 6)).ok
    assert kernel.stores() == [("unbind", "virtio-mmio.1")]
    assert not (kernel.root / DRV / "virtio-mmio.1").exists()
    assert c.call(_mmio(MsgType.DEL_MMIO, 0xD000_1000, 6)).ok
    assert kernel.stores() == [("unbind", "virtio-mmio.1")]


def test_mmio_at_an_unknown_base_is_enodev(tmp_path, serve):
    kernel = _kernel(tmp_path)
    c = serve(_dm(kernel)).connect()
    assert c.call(_mmio(MsgType.ADD_MMIO, 0xD000_2000, 7)).ret == -errno.ENODEV
    assert c.call(_mmio(MsgType.DEL_MMIO, 0xD000_2000, 7)).ret == -errno.ENODEV
    assert kernel.writes == []


def test_mmio_with_the_wrong_irq_is_einval(tmp_path, serve):
    kernel = _kernel(tmp_path)
    c = serve(_dm(kernel)).connect()
    assert c.call(_mmio(MsgType.ADD_MMIO, 0xD000_1000, 5)).ret == -errno.EINVAL
    assert kernel.writes == []


def test_a_slot_the_vmm_did_not_populate_does_not_bind(tmp_path, serve):
    kernel = _kernel(tmp_path)  # only virtio-mmio.1 is populated
    c = serve(_dm(kernel)).connect()
    assert c.call(_mmio(MsgType.ADD_MMIO, 0xD000_0000, 5)).ret == -errno.ENODEV
    assert kernel.stores() == [("bind", "virtio-mmio.0")]  # tried; the kernel's probe declined it
    assert not (kernel.root / DRV / "virtio-mmio.0").exists()


def test_parse_device_param_and_iomem():
    assert parse_device_param(PARAM_TEXT + "garbage\n") == [
        MmioSlot("virtio-mmio.0", 0xD000_0000, 0x1000, 5), MmioSlot("virtio-mmio.1", 0xD000_1000, 0x1000, 6)]
    assert parse_iomem(IOMEM_TEXT) == [MmioSlot("virtio-mmio.0", 0xD000_0000, 0x1000),
                                       MmioSlot("virtio-mmio.1", 0xD000_1000, 0x1000)]
    assert parse_iomem("  d0002000-d0002fff : virtio-mmio.7\n")[0].name == "virtio-mmio.7"  # nested


# --- CPUs -------------------------------------------------------------------------------------------------

def _cpu(t: MsgType, *ids: int) -> Request:
    return Request(t, CpuRequest(ids))


def test_add_and_remove_cpus(tmp_path, serve):
    kernel = _kernel(tmp_path, cpus=4, cpus_online=(0,))
    c = serve(_dm(kernel)).connect()
    assert c.call(_cpu(MsgType.ADD_CPU, 1, 2)).ok
    assert [kernel.cpu_online(n) for n in range(4)] == [True, True, True, False]
    assert c.call(_cpu(MsgType.DEL_CPU, 2)).ok
    assert [kernel.cpu_online(n) for n in range(4)] == [True, True, False, False]
    assert kernel.stores() == [("cpu1/online", "1"), ("cpu2/online", "1"), ("cpu2/online", "0")]


def test_a_cpu_that_fails_undoes_the_request_and_names_its_index(tmp_path, serve):
    kernel = _kernel(tmp_path, cpus=4, cpus_online=(0,), cpu_refuse=(3,))
    c = serve(_dm(kernel)).connect()
    reply = c.call(_cpu(MsgType.ADD_CPU, 1, 2, 3))
    assert (reply.ret, reply.cpu_index) == (-errno.EIO, 2)
    assert [kernel.cpu_online(n) for n in range(4)] == [True, False, False, False]
    assert kernel.stores() == [("cpu1/online", "1"), ("cpu2/online", "1"), ("cpu3/online", "1"),  # EIO
                               ("cpu2/online", "0"), ("cpu1/online", "0")]


def test_cpu0_cannot_be_removed_and_the_others_come_back(tmp_path, serve):
    kernel = _kernel(tmp_path, cpus=2, cpus_online=(0, 1))
    c = serve(_dm(kernel)).connect()
    reply = c.call(_cpu(MsgType.DEL_CPU, 1, 0))
    assert (reply.ret, reply.cpu_index) == (-errno.EBUSY, 1)
    assert kernel.cpu_online(1)
    reply = c.call(_cpu(MsgType.ADD_CPU, 5))
    assert (reply.ret, reply.cpu_index) == (-errno.ENODEV, 0)  # not present
