"""The device event loop: one thread, epoll, callbacks per file descriptor.

Virtio devices are driven by file descriptors only: queue kicks arrive on
eventfds (KVM ioeventfds in the built-in VMM, kick fds from a vhost-user
front end), and back ends own sockets, taps and files.  So a device registers
``fd -> callback`` here and never sees a vCPU thread.  Callbacks run on the
loop's thread, one at a time; an exception in one is logged and that fd is
dropped, so a broken device cannot take the loop (or the VMM) down.

Started with :meth:`EventLoop.start`, the loop's thread loads its seccomp
filter (``katapy.vmm.seccomp``, the device list) before its first poll:
the devices' files, sockets and eventfds are opened by the builder on the
caller's thread, the loop only uses them.  A loop run on a caller's own
thread (``run()`` called directly) is not filtered.
"""
from __future__ import annotations

import os
import select
import threading
from typing import Callable, TypeVar

from katapy import log
from katapy.vmm import seccomp

_log = log.get("vmm.eventloop")

Callback = Callable[[int, int], None]  # (fd, epoll events)
T = TypeVar("T")


class LoopStoppedError(RuntimeError):
    """The loop stopped before it ran a function handed to :meth:`EventLoop.run_sync`."""


class EventLoop:
    def __init__(self, name: str = "katapy-devices"):
        self._ep = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._pending: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.name = name

    # -- registration (thread-safe) ----------------------------------------
    def add(self, fd: int, callback: Callback, events: int = select.EPOLLIN) -> None:
        with self._lock:
            self._callbacks[fd] = callback
            self._ep.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        with self._lock:
            if fd in self._callbacks:
                self._ep.modify(fd, events)

    def remove(self, fd: int) -> None:
        with self._lock:
            if self._callbacks.pop(fd, None) is not None:
                try:
                    self._ep.unregister(fd)
                except (OSError, ValueError):
                    pass

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (from any thread)."""
        with self._lock:
            self._pending.append(fn)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    def run_sync(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop thread and return its result (or raise its exception).

        A device's queues are processed by callbacks on this thread; whatever else
        changes a device's state (activation and reset, which a vCPU thread triggers
        through the virtio-mmio status register) must run here too, or two threads
        could pop and complete the same descriptor chains.  Inline when called on
        the loop thread or while the loop is not running.
        """
        t = self._thread
        if t is None or not t.is_alive() or t is threading.current_thread():
            return fn()
        done = threading.Event()
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # handed back to the caller's thread
                outcome["error"] = exc
            done.set()

        self.call_soon(call)
        while not done.wait(0.5):
            if self._stop or not t.is_alive():
                raise LoopStoppedError(f"event loop {self.name} stopped before running {fn!r}")
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]

    # -- running -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def run(self) -> None:
        if self._thread is threading.current_thread():
            try:
                seccomp.install(seccomp.ThreadClass.DEVICES)
            except seccomp.SeccompError as exc:  # no devices rather than unconfined ones
                _log.error("seccomp filter failed; event loop not started", loop=self.name, error=str(exc))
                return
        while not self._stop:
            try:
                ready = self._ep.poll(1.0)
            except InterruptedError:
                continue
            for fd, ev in ready:
                if fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    with self._lock:
                        pending, self._pending = self._pending, []
                    for fn in pending:
                        self._run_one(fn)
                    continue
                cb = self._callbacks.get(fd)
                if cb is not None:
                    self._run_one(lambda cb=cb, fd=fd, ev=ev: cb(fd, ev), fd)

    def _run_one(self, fn: Callable[[], None], fd: int | None = None) -> None:
        try:
            fn()
        except Exception as exc:  # a device bug must not kill the loop
            _log.error("device callback failed; fd dropped", fd=fd, error=repr(exc), exc_info=True)
            if fd is not None:
                self.remove(fd)

    def stop(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.stop()
        self._ep.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
