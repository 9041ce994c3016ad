"""Threaded ttrpc server, standard library + protobuf only (no trio).

The guest agent runs under slow emulation where importing trio costs seconds,
so it serves ttrpc with this module instead of :mod:`katapy.ttrpc.server`.  It
shares framing (:mod:`frame`) and the request rules (:mod:`dispatch`) with the
trio server and has the same semantics:

* one reader thread per connection decodes frames; every request runs its
  (synchronous) handler ``handler(request, ctx) -> response`` in its own
  thread, so answers leave in completion order;
* a request with ``timeout_nano`` is answered DEADLINE_EXCEEDED when its
  deadline passes even if the handler is still running: threads cannot be
  cancelled, so ``ctx.cancelled`` is set and the handler's late result is
  dropped (each stream id is answered exactly once);
* oversize frames, even stream ids, unknown services/methods, bad payloads and
  garbage get the same answers as from the trio server; a garbage connection is
  closed, others carry on;
* when a connection ends, ``ctx.cancelled`` is set for its running handlers and
  their results are dropped.

Sockets may be of any stream family (AF_UNIX, AF_VSOCK, ...).
"""
from __future__ import annotations

import heapq
import itertools
import os
import selectors
import socket
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from katapy.ttrpc import dispatch, frame
from katapy.ttrpc.dispatch import Call, Method, Registry
from katapy.ttrpc.errors import Code, TtrpcError

if TYPE_CHECKING:
    import logging

RECEIVE_SIZE = 64 * 1024
_DEADLINE_MESSAGE = "context deadline exceeded"


class SyncServer:
    """Serves registered services on blocking sockets, one thread per request."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        # ``logger``: anything with debug/info/warning/exception(msg, *args); the guest agent
        # passes its own (stdlib logging costs ~0.1 s of import time under TCG).
        self._registry = Registry()
        if logger is None:
            import logging

            logger = logging.getLogger("katapy.ttrpc.sync_server")
        self._log = logger
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False

    def register(self, service: str, methods: Mapping[str, Method]) -> None:
        """Register ``{method: (RequestCls, handler(request, ctx) -> response)}``."""
        self._registry.register(service, methods)

    def serve(self, sock: socket.socket) -> None:
        """Serve ``sock``: a listening socket (accept loop) or one accepted connection."""
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.serve_listener(sock)
        else:
            self.serve_connection(sock)

    def serve_connection(self, sock: socket.socket) -> None:
        """Serve one connection in the calling thread until it ends; closes ``sock``."""
        conn = _Connection(self._registry, sock, self._log)
        with self._lock:
            if self._stopping:
                sock.close()
                return
            self._connections.add(conn)
        try:
            conn.run()
        except Exception:  # one connection never takes the server down
            self._log.exception("ttrpc connection failed")
        finally:
            conn.close()
            with self._lock:
                self._connections.discard(conn)

    def serve_listener(self, listener: socket.socket) -> None:
        """Accept connections until :meth:`shutdown`; each is served in its own thread.

        ``listener`` stays open (its owner closes it).
        """
        listener.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_r in ready or self._stopping:
                    break
                try:
                    conn_sock, _ = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    self._log.warning("ttrpc accept failed: %s", exc)
                    time.sleep(0.1)
                    continue
                conn_sock.setblocking(True)
                threading.Thread(
                    target=self.serve_connection, args=(conn_sock,), name="ttrpc-conn", daemon=True
                ).start()

    def start(self, sock: socket.socket) -> threading.Thread:
        """Run :meth:`serve` in a daemon thread and return it."""
        thread = threading.Thread(target=self.serve, args=(sock,), name="ttrpc-serve", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        """Stop accepting, close every connection (their handlers see ``ctx.cancelled``)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            connections = list(self._connections)
        os.write(self._wake_w, b"x")
        for conn in connections:
            conn.abort()

    def close(self) -> None:
        """:meth:`shutdown` and release the wake-up pipe (call once serving threads returned)."""
        self.shutdown()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1


class _CallState:
    """A running request: answered exactly once, by its handler or by its deadline."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self._claim = threading.Lock()
        self._claimed = False

    def claim(self) -> bool:
        """True for the first caller only; that caller sends the answer."""
        with self._claim:
            if self._claimed:
                return False
            self._claimed = True
            return True


class _Connection:
    """One served socket: reader loop, request threads, deadline watcher."""

    def __init__(self, registry: Registry, sock: socket.socket, logger: logging.Logger) -> None:
        self._registry = registry
        self._sock = sock
        self._log = logger
        self._send_lock = threading.Lock()
        self._state_lock = threading.Condition()
        self._active: dict[int, _CallState] = {}
        self._deadlines: list[tuple[float, int, _CallState]] = []
        self._seq = itertools.count()
        self._watcher: threading.Thread | None = None
        self._closed = False

    def run(self) -> None:
        decoder = frame.FrameDecoder()
        while not self._closed:
            try:
                data = self._sock.recv(RECEIVE_SIZE)
            except OSError:
                break
            if not data:
                if not decoder.at_boundary:
                    self._log.info("ttrpc peer closed mid-frame (%d bytes buffered)", decoder.buffered)
                break
            try:
                events = decoder.feed(data)
            except frame.FrameError as exc:
                self._handle_all(exc.events)
                self._log.warning("ttrpc closing connection: %s", exc)
                break
            self._handle_all(events)

    def _handle_all(self, events: list[frame.Event]) -> None:
        for event in events:
            if isinstance(event, frame.OversizeFrame):
                self._log.warning("ttrpc oversize frame discarded (stream %d)", event.stream_id)
                self._send(dispatch.oversize_response(event))
                continue
            with self._state_lock:
                prepared = dispatch.prepare(self._registry, event, self._active.__contains__)
                state = _CallState(prepared) if isinstance(prepared, Call) else None
                if state is not None:
                    self._active[state.call.stream_id] = state
                    self._arm_deadline(state)
            if state is not None:
                name = f"ttrpc-{state.call.context.method}-{state.call.stream_id}"
                threading.Thread(target=self._run_call, args=(state,), name=name, daemon=True).start()
            elif prepared is None:
                self._log.debug("ttrpc frame ignored (stream %d type %d)", event.stream_id, event.type)
            else:
                self._send(prepared)

    def _arm_deadline(self, state: _CallState) -> None:
        """Record the call's deadline (``_state_lock`` held) and make sure the watcher runs."""
        ctx = state.call.context
        if ctx.timeout is None:
            return
        ctx.deadline = time.monotonic() + ctx.timeout
        heapq.heappush(self._deadlines, (ctx.deadline, next(self._seq), state))
        self._state_lock.notify()
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch_deadlines, name="ttrpc-deadlines", daemon=True)
            self._watcher.start()

    def _run_call(self, state: _CallState) -> None:
        call = state.call
        result: object = None
        error: BaseException | None = None
        try:
            result = call.handler(call.request, call.context)
        except Exception as exc:
            error = exc
            if not isinstance(exc, TtrpcError):
                self._log.warning("ttrpc handler %s/%s raised %r", call.context.service, call.context.method, exc)
        if not state.claim():
            return  # the deadline (or connection close) answered already
        self._finish(call.stream_id)
        self._send(dispatch.outcome_response(call.stream_id, result, error))

    def _watch_deadlines(self) -> None:
        with self._state_lock:
            while not self._closed:
                if not self._deadlines:
                    self._state_lock.wait()
                    continue
                deadline, _, state = self._deadlines[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._state_lock.wait(delay)
                    continue
                heapq.heappop(self._deadlines)
                if not state.claim():
                    continue
                state.call.context.cancelled.set()
                self._active.pop(state.call.stream_id, None)
                reply = dispatch.error_response(state.call.stream_id, Code.DEADLINE_EXCEEDED, _DEADLINE_MESSAGE)
                self._state_lock.release()
                try:
                    self._send(reply)
                finally:
                    self._state_lock.acquire()

    def _finish(self, stream_id: int) -> None:
        with self._state_lock:
            self._active.pop(stream_id, None)

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            if self._closed:
                return
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._log.info("ttrpc peer gone while answering: %s", exc)
                self.abort()

    def abort(self) -> None:
        """Wake the reader and any blocked writer; :meth:`run` then returns."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Drop every running call (results discarded), stop the watcher, close the socket."""
        with self._send_lock:
            self._closed = True
        with self._state_lock:
            for state in self._active.values():
                if state.claim():
                    state.call.context.cancelled.set()
            self._active.clear()
            self._deadlines.clear()
            self._state_lock.notify_all()
        watcher = self._watcher
        if watcher is not None:
            watcher.join()
        self._sock.close()


Server = SyncServer

__all__ = ["SyncServer", "Server"]
