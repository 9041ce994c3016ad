"""Forward task events to containerd: ttrpc ``containerd.services.events.ttrpc.v1.Events/Forward``
on ``TTRPC_ADDRESS`` (containerd v1.6 ``runtime/v2/shim/publisher.go``; docs/protocols.md §2).

Events leave in the order they were published: one task drains a queue and
sends each envelope before the next, with a 5 s deadline per attempt and up
to 5 attempts (linear back-off, redialling a closed connection), as the
reference publisher does.  ``Any.type_url`` is the bare full message name
(typeurl v1.0.2), e.g. ``containerd.events.TaskExit``.
"""
from __future__ import annotations

import math
import time
from typing import Any

import trio
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

from katapy import log
from katapy.pb import containerd_events_pb2 as ev_pb
from katapy.pb import containerd_events_ttrpc_pb2 as fwd_pb
from katapy.pb import containerd_mount_pb2 as mount_pb
from katapy.shim import events as ev
from katapy.ttrpc.client import Client
from katapy.ttrpc.errors import TtrpcError

SERVICE = "containerd.services.events.ttrpc.v1.Events"
ATTEMPTS = 5
ATTEMPT_TIMEOUT_S = 5.0
BACKOFF_S = 0.1
NAMESPACE_KEY = "containerd-namespace-ttrpc"


def timestamp(t: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp for ``t`` seconds since the epoch."""
    ts = timestamp_pb2.Timestamp()
    ts.seconds = int(t)
    ts.nanos = int((t - int(t)) * 1e9)
    return ts


def to_proto(event: ev.TaskEvent) -> Any:
    """The containerd.events message for a typed event."""
    match event:
        case ev.TaskCreated():
            return ev_pb.TaskCreate(
                container_id=event.container_id,
                bundle=event.bundle,
                rootfs=[mount_pb.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
                        for m in event.rootfs],
                io=ev_pb.TaskIO(stdin=event.stdio.stdin, stdout=event.stdio.stdout, stderr=event.stdio.stderr,
                                terminal=event.stdio.terminal),
                pid=event.pid,
            )
        case ev.TaskStarted():
            return ev_pb.TaskStart(container_id=event.container_id, pid=event.pid)
        case ev.TaskExited():
            return ev_pb.TaskExit(container_id=event.container_id, id=event.id, pid=event.pid,
                                  exit_status=event.exit_status, exited_at=timestamp(event.exited_at))
        case ev.TaskDeleted():
            return ev_pb.TaskDelete(container_id=event.container_id, id=event.id, pid=event.pid,
                                    exit_status=event.exit_status, exited_at=timestamp(event.exited_at))
        case ev.ExecAdded():
            return ev_pb.TaskExecAdded(container_id=event.container_id, exec_id=event.exec_id)
        case ev.ExecStarted():
            return ev_pb.TaskExecStarted(container_id=event.container_id, exec_id=event.exec_id, pid=event.pid)
        case ev.TaskOOM():
            return ev_pb.TaskOOM(container_id=event.container_id)
        case ev.TaskPaused():
            return ev_pb.TaskPaused(container_id=event.container_id)
        case ev.TaskResumed():
            return ev_pb.TaskResumed(container_id=event.container_id)
    raise TypeError(f"not a task event: {event!r}")


def envelope(namespace: str, event: ev.TaskEvent, at: float | None = None) -> fwd_pb.Envelope:
    msg = to_proto(event)
    packed = any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())
    return fwd_pb.Envelope(timestamp=timestamp(time.time() if at is None else at), namespace=namespace,
                           topic=event.topic, event=packed)


class EventPublisher:
    """Ordered, retrying event forwarder.  Run :meth:`run` in a nursery; call :meth:`publish`."""

    def __init__(self, ttrpc_address: str, namespace: str) -> None:
        self.address = ttrpc_address
        self.namespace = namespace
        self._send, self._receive = trio.open_memory_channel[fwd_pb.Envelope](math.inf)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self._client: Client | None = None
        self._client_scope: Any = None
        self._log = log.get("shim.publisher", address=ttrpc_address)
        self.sent = 0
        self.dropped = 0

    def publish(self, event: ev.TaskEvent) -> None:
        """Queue ``event`` (never blocks); it is sent after everything queued before it."""
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._send.send_nowait(envelope(self.namespace, event))
        self._log.debug("event queued", topic=event.topic, container_id=event.container_id)

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event was sent (or dropped); False on timeout."""
        with trio.move_on_after(timeout):
            await self._idle.wait()
            return True
        return False

    async def run(self) -> None:
        """Send queued envelopes in order until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                async for env in self._receive:
                    await self._forward(env)
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()
            finally:
                await self._disconnect()

    async def _forward(self, env: fwd_pb.Envelope) -> None:
        req = fwd_pb.ForwardRequest(envelope=env)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                client = await self._connect()
                await client.call(SERVICE, "Forward", req, empty_pb2.Empty, timeout=ATTEMPT_TIMEOUT_S,
                                  metadata={NAMESPACE_KEY: self.namespace})
                self.sent += 1
                return
            except TtrpcError as exc:
                self._log.warning("forward failed", topic=env.topic, attempt=attempt, error=str(exc))
                await self._disconnect()
            await trio.sleep(BACKOFF_S * attempt)
        self.dropped += 1
        self._log.error("event dropped after retries", topic=env.topic, attempts=ATTEMPTS)

    async def _connect(self) -> Client:
        if self._client is not None and not self._client.closed:
            return self._client
        client = await Client.connect_unix(self.address)

        async def hold(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self._client_scope = scope
                async with client:
                    task_status.started()
                    await trio.sleep_forever()

        await self._nursery.start(hold)
        self._client = client
        return client

    async def _disconnect(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._client_scope is not None:
            self._client_scope.cancel()
            self._client_scope = None

