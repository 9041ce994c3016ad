"""The shim daemon: serve the Task service over ttrpc on the listener containerd's ``start`` handed over (fd 3).

One trio run holds everything: the ttrpc server, the event publisher, the
runtime handler's stdio pumps and waiters.  It ends when Shutdown is
accepted (after the answer and the queued events went out) or on
SIGTERM/SIGINT, stopping the sandbox first.  SIGUSR1 logs a debug dump
(katapy.shim.debug_dump: thread stacks, allocation sites when tracing).
"""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import trio

from katapy import log
from katapy.shim.args import ShimArgs

LISTENER_FD = 3
GRACE_S = 0.2


async def serve(args: ShimArgs, listener: socket.socket) -> None:
    from katapy.shim.dispatcher import Dispatcher
    from katapy.shim.publisher import EventPublisher
    from katapy.shim.service import TaskService
    from katapy.shim.virt_container import VirtContainer
    from katapy.ttrpc.server import Server

    logger = log.get("shim.daemon", id=args.id, namespace=args.namespace)
    ttrpc_address = os.environ.get("TTRPC_ADDRESS") or f"{args.address}.ttrpc"
    publisher = EventPublisher(ttrpc_address, args.namespace)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        handler = VirtContainer(publisher.publish, nursery)
        dispatcher = Dispatcher(handler)
        server = Server()
        service = TaskService(dispatcher)
        service.register(server)
        from katapy.shim.metrics import ShimMetrics

        nursery.start_soon(ShimMetrics(handler, service.requests).run, handler.sandbox_started)
        nursery.start_soon(server.serve_unix, listener)
        logger.info("shim serving", pid=os.getpid(), socket=args.socket, events=ttrpc_address)
        nursery.start_soon(_dump_on_sigusr1, logger)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as waiters:
                async def on_shutdown() -> None:
                    await dispatcher.shutdown_requested.wait()
                    waiters.cancel_scope.cancel()

                async def on_signal() -> None:
                    async for signum in signals:
                        logger.info("signal received; stopping sandbox", signal=signum)
                        await handler.stop_sandbox()
                        waiters.cancel_scope.cancel()
                        return

                waiters.start_soon(on_shutdown)
                waiters.start_soon(on_signal)
        await publisher.flush()
        await trio.sleep(GRACE_S)  # let the Shutdown answer leave before the socket closes
        nursery.cancel_scope.cancel()
    logger.info("shim exiting", events_sent=publisher.sent, events_dropped=publisher.dropped)


async def _dump_on_sigusr1(logger: object) -> None:
    from katapy.shim.debug_dump import AllocationSites, dump

    sites = AllocationSites()
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            dump(logger, sites)


def run(args: ShimArgs) -> int:
    listener = socket.socket(fileno=LISTENER_FD)
    try:
        trio.run(serve, args, listener)
    finally:
        listener.close()
        if args.socket:
            Path(args.socket).unlink(missing_ok=True)
    return 0
