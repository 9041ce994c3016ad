"""A vhost-user back end serving one katapy VirtioDevice to a front end such as QEMU.

The server owns an :class:`EventLoop` thread on which both the control socket
and the device run, so front-end messages and queue processing never race.
Ring life cycle (vhost-user.rst, "Ring states"): a ring is *started* once it
has a kick fd and *enabled* by SET_VRING_ENABLE (immediately, if
VHOST_USER_F_PROTOCOL_FEATURES was not negotiated); when every configured
ring is started and enabled the device is activated with them.
GET_VRING_BASE stops the rings (the device is reset) and reports where the
avail index stopped.  Vring addresses arrive as the front end's *user*
addresses and are translated to guest-physical through the memory table.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass, field

from katapy import log
from katapy.vmm.eventloop import EventLoop
from katapy.vmm.memory import GuestMemory, GuestMemoryError, MemoryRegion
from katapy.vmm.virtio.device import VIRTIO_F_EVENT_IDX, DeviceError, EventFdInterrupt, QueueState, VirtioDevice
from katapy.vmm.virtio.vhost_user.protocol import (
    F_LOG_ALL, F_PROTOCOL_FEATURES, MemRegion, Message, ProtocolError, ProtocolFeature, Request, VringAddr,
    parse_mem_table, recv_message, send_reply,
)

_log = log.get("vmm.virtio.vhost_user")

SUPPORTED_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK | 1 << ProtocolFeature.CONFIG
)
MESSAGE_TIMEOUT_S = 5.0
MAX_CONFIG_SIZE = 256


@dataclass
class _Vring:
    state: QueueState
    kick: int = -1
    call: int = -1
    err: int = -1
    addr_set: bool = False
    started: bool = False
    enabled: bool = False
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in (self.kick, self.call, self.err):
            if fd >= 0:
                os.close(fd)
        self.kick = self.call = self.err = -1


class VhostUserServer:
    """``VhostUserServer(device, socket_path).start()`` listens; QEMU connects as the front end."""

    def __init__(self, device: VirtioDevice, socket_path: str | os.PathLike[str]):
        self.device = device
        self.socket_path = os.fspath(socket_path)
        self.loop = EventLoop(name=f"vhost-user-{type(device).__name__}")
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._mem: GuestMemory | None = None
        self._regions: list[MemRegion] = []
        self._vrings = [_Vring(QueueState(max_size=n)) for n in device.queue_max_sizes]
        self._features = 0
        self._protocol_features = 0
        self._active = False
        self._interrupt = EventFdInterrupt({})
        self._started = False

    # -- life cycle -------------------------------------------------------------
    def start(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._listener.bind(self.socket_path)
        self._listener.listen(1)
        self.loop.add(self._listener.fileno(), self._on_accept)
        self.loop.start()
        self._started = True
        _log.info("vhost-user back end listening", socket=self.socket_path, device=type(self.device).__name__)

    def stop(self) -> None:
        """Disconnect the front end, close every fd, unmap guest memory, stop the thread."""
        if not self._started:
            return
        self._started = False
        done = threading.Event()

        def teardown() -> None:
            try:
                self._disconnect("server stopping")
                if self._listener is not None:
                    self.loop.remove(self._listener.fileno())
                    self._listener.close()
                    self._listener = None
            finally:
                done.set()

        self.loop.call_soon(teardown)
        done.wait(10)
        self.loop.close()
        self.device.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "VhostUserServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connection --------------------------------------------------------------
    def _on_accept(self, fd: int, events: int) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE: the front end is told nothing; the event loop must live on
            _log.warning("vhost-user accept failed", error=str(exc))
            return
        if self._conn is not None:
            _log.warning("vhost-user: second front end refused")
            conn.close()
            return
        conn.setblocking(True)
        conn.settimeout(MESSAGE_TIMEOUT_S)
        self._conn = conn
        self.loop.add(conn.fileno(), self._on_message)
        _log.info("vhost-user front end connected")

    def _disconnect(self, why: str) -> None:
        self._deactivate()
        if self._conn is not None:
            _log.info("vhost-user front end disconnected", reason=why)
            self.loop.remove(self._conn.fileno())
            self._conn.close()
            self._conn = None
        for v in self._vrings:
            v.close_fds()
            v.state = QueueState(max_size=v.state.max_size)
            v.addr_set = v.started = v.enabled = False
        self._set_memory(None, [])
        self._features = self._protocol_features = 0

    def _on_message(self, fd: int, events: int) -> None:
        try:
            msg = recv_message(self._conn)
        except (ProtocolError, OSError) as e:
            _log.error("vhost-user: bad message from the front end", error=str(e))
            self._disconnect("bad message")
            return
        if msg is None:
            self._disconnect("front end closed the socket")
            return
        try:
            name = Request(msg.request).name
        except ValueError:
            name = str(msg.request)
        _log.debug("vhost-user request", request=name, size=len(msg.payload), fds=len(msg.fds), flags=msg.flags)
        try:
            reply = self._dispatch(msg)
            ok = True
        except Exception as e:  # noqa: BLE001 - whatever a request raised, this front end is done with or told
            expected = isinstance(e, (ProtocolError, DeviceError, ValueError, OSError))
            _log.error("vhost-user: request failed", request=name, error=str(e), exc_info=not expected)
            for f in msg.fds:
                _close_quietly(f)
            if not (msg.need_reply and self._has_protocol(ProtocolFeature.REPLY_ACK)):
                self._disconnect(f"request {name} failed")
                return
            reply, ok = None, False
        try:
            if reply is not None:
                send_reply(self._conn, msg.request, reply)
            elif msg.need_reply and self._has_protocol(ProtocolFeature.REPLY_ACK):
                send_reply(self._conn, msg.request, struct.pack("<Q", 0 if ok else 1))
        except OSError as e:
            self._disconnect(f"reply failed: {e}")

    def _has_protocol(self, f: ProtocolFeature) -> bool:
        return bool(self._protocol_features >> f & 1)

    def _vring(self, index: int) -> _Vring:
        if not 0 <= index < len(self._vrings):
            raise ProtocolError(f"vring index {index} out of range (device has {len(self._vrings)})")
        return self._vrings[index]

    # -- requests ----------------------------------------------------------------
    def _dispatch(self, msg: Message) -> bytes | None:
        """Handle one request; returns an explicit reply payload or None."""
        r = msg.request
        if r not in (Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR,
                     Request.SET_BACKEND_REQ_FD) and msg.fds:
            raise ProtocolError(f"request {r} carries {len(msg.fds)} unexpected fds")
        if r == Request.GET_FEATURES:
            return struct.pack("<Q", self.device.avail_features() | 1 << F_PROTOCOL_FEATURES)
        if r == Request.SET_FEATURES:
            v = msg.u64()
            offered = self.device.avail_features() | 1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL
            if v & ~offered:
                raise ProtocolError(f"front end acked features {v & ~offered:#x} we never offered")
            self._features = v
            self.device.ack_features(v & ~(1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL))
            return None
        if r == Request.GET_PROTOCOL_FEATURES:
            return struct.pack("<Q", SUPPORTED_PROTOCOL_FEATURES)
        if r == Request.SET_PROTOCOL_FEATURES:
            self._protocol_features = msg.u64() & SUPPORTED_PROTOCOL_FEATURES
            return None
        if r == Request.SET_OWNER:
            return None
        if r == Request.RESET_OWNER:
            self._deactivate()
            self._features = 0
            return None
        if r == Request.GET_QUEUE_NUM:
            return struct.pack("<Q", len(self._vrings))
        if r == Request.SET_MEM_TABLE:
            return self._set_mem_table(msg)
        if r == Request.SET_VRING_NUM:
            index, num = msg.vring_state()
            v = self._vring(index)
            if not 0 < num <= v.state.max_size or num & (num - 1):
                raise ProtocolError(f"vring {index}: size {num} (max {v.state.max_size})")
            v.state.size = num
            return None
        if r == Request.SET_VRING_ADDR:
            a = VringAddr.parse(msg.payload)
            v = self._vring(a.index)
            v.state.desc_table = self._to_guest(a.desc_user_addr)
            v.state.avail_ring = self._to_guest(a.avail_user_addr)
            v.state.used_ring = self._to_guest(a.used_user_addr)
            v.addr_set = True
            return None
        if r == Request.SET_VRING_BASE:
            index, num = msg.vring_state()
            v = self._vring(index)
            if num > 0xFFFF:
                raise ProtocolError(f"vring {index}: base {num} is not a 16-bit index")
            v.state.next_avail = num
            return None
        if r == Request.GET_VRING_BASE:
            index, _ = msg.vring_state()
            v = self._vring(index)
            self._deactivate()
            v.started = v.enabled = False
            if v.kick >= 0:
                os.close(v.kick)
                v.kick = -1
            return struct.pack("<II", index, v.state.next_avail)
        if r in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            return self._set_vring_fd(msg)
        if r == Request.SET_VRING_ENABLE:
            index, num = msg.vring_state()
            v = self._vring(index)
            if not num and self._active:
                self._deactivate()
            v.enabled = bool(num)
            self._try_activate()
            return None
        if r == Request.GET_CONFIG:
            offset, size, flags = self._config_header(msg)
            return struct.pack("<III", offset, size, flags) + self.device.read_config(offset, size)
        if r == Request.SET_CONFIG:
            offset, size, _ = self._config_header(msg)
            if len(msg.payload) < 12 + size:
                raise ProtocolError("SET_CONFIG payload shorter than its size")
            self.device.write_config(offset, msg.payload[12 : 12 + size])
            return None
        if r == Request.SET_BACKEND_REQ_FD:
            for f in msg.fds:  # we never send back-end requests; accept and drop the channel
                os.close(f)
            return None
        raise ProtocolError(f"unsupported request {r}")

    def _config_header(self, msg: Message) -> tuple[int, int, int]:
        if len(msg.payload) < 12:
            raise ProtocolError("short config message")
        offset, size, flags = struct.unpack_from("<III", msg.payload)
        if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config access {offset}+{size} out of range")
        return offset, size, flags

    def _set_mem_table(self, msg: Message) -> None:
        regions = parse_mem_table(msg.payload)
        if len(msg.fds) != len(regions):
            raise ProtocolError(f"memory table has {len(regions)} regions but {len(msg.fds)} fds")
        was_active = self._active
        self._deactivate()
        mapped: list[MemoryRegion] = []
        try:
            # one region at a time, so every fd is owned by exactly one place when something fails
            while msg.fds:
                r, fd = regions[len(mapped)], msg.fds[0]
                one = GuestMemory.from_fds([(r.guest_phys_addr, r.memory_size, fd, r.mmap_offset)])
                msg.fds.pop(0)
                mapped.append(one.regions[0])
            mem = GuestMemory(mapped)
        except BaseException as e:
            for m in mapped:
                m.mapping.close()
                os.close(m.fd)
            if isinstance(e, (GuestMemoryError, OverflowError)):
                # overlapping regions, or an mmap_offset/size no mmap can take: the table is bad
                raise ProtocolError(f"memory table cannot be mapped: {e}") from None
            raise
        self._set_memory(mem, regions)
        _log.info("vhost-user memory table", regions=[(hex(r.guest_phys_addr), r.memory_size) for r in regions])
        if was_active:
            self._try_activate()
        return None

    def _set_memory(self, mem: GuestMemory | None, regions: list[MemRegion]) -> None:
        if self._mem is not None:
            self._mem.close()
        self._mem, self._regions = mem, regions

    def _to_guest(self, user_addr: int) -> int:
        for r in self._regions:
            if r.userspace_addr <= user_addr < r.userspace_addr + r.memory_size:
                return r.guest_phys_addr + (user_addr - r.userspace_addr)
        raise ProtocolError(f"front-end address {user_addr:#x} is in no memory region")

    def _set_vring_fd(self, msg: Message) -> None:
        v64 = msg.u64()
        index, no_fd = v64 & 0xFF, bool(v64 & 0x100)
        if no_fd and msg.fds or not no_fd and len(msg.fds) != 1:
            raise ProtocolError(f"vring fd message: {len(msg.fds)} fds with invalid-fd flag {no_fd}")
        v = self._vring(index)
        fd = -1 if no_fd else msg.fds.pop()
        if msg.request == Request.SET_VRING_KICK:
            if no_fd:
                raise ProtocolError("polling mode (no kick fd) is not supported")
            self._deactivate()
            if v.kick >= 0:
                os.close(v.kick)
            os.set_blocking(fd, False)
            v.kick = fd
            v.started = True
            if not self._features >> F_PROTOCOL_FEATURES & 1:
                v.enabled = True
            self._try_activate()
        elif msg.request == Request.SET_VRING_CALL:
            if v.call >= 0:
                os.close(v.call)
            v.call = fd
            if fd >= 0:
                self._interrupt.call_fds[index] = fd
            else:
                self._interrupt.call_fds.pop(index, None)
        else:
            if v.err >= 0:
                os.close(v.err)
            v.err = fd
        return None

    # -- device activation -----------------------------------------------------
    def _try_activate(self) -> None:
        if self._active or self._mem is None:
            return
        configured = [v for v in self._vrings if v.addr_set]
        n = len(configured)
        if n == 0 or configured != self._vrings[:n]:
            return
        if not all(v.started and v.enabled and v.state.size for v in configured):
            return
        event_idx = bool(self._features >> VIRTIO_F_EVENT_IDX & 1)
        for v in configured:
            v.state.ready = True
            v.state.event_idx = event_idx
            v.state.next_used = self._mem.read_u16(v.state.used_ring + 2) if self._mem.check_range(
                v.state.used_ring, 4) else 0
        try:
            self.device.activate(self._mem, [v.state for v in configured], [v.kick for v in configured],
                                 self._interrupt, self.loop)
        except DeviceError as e:
            _log.error("vhost-user: device refused to activate", error=str(e))
            self.device.reset()
            return
        self._active = True
        _log.info("vhost-user device started", queues=n)

    def _deactivate(self) -> None:
        if self._active:
            self._active = False
            self.device.reset()
            _log.info("vhost-user device stopped")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
