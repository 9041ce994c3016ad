"""Dispatcher: one match on the Task request kind (Kata runtime-rs ``RuntimeHandlerManager::handler_message``).

The service layer hands it katapy request types; it routes each to the
runtime handler (VirtContainer) or its container manager and returns katapy
response types.  Shutdown is answered here: ignored while containers remain
(a grouped shim serves a whole pod), otherwise the sandbox stops and the
daemon is told to exit once the answer is sent.
"""
from __future__ import annotations

import os

import trio

from katapy import __version__, log
from katapy.shim import types as t
from katapy.shim.errors import Unimplemented
from katapy.shim.virt_container import VirtContainer


class Dispatcher:
    def __init__(self, handler: VirtContainer) -> None:
        self.handler = handler
        self.shutdown_requested = trio.Event()
        self._log = log.get("shim.dispatcher")

    async def handle(self, req: t.TaskRequest) -> t.TaskResponse:
        h = self.handler
        match req:
            case t.CreateTask():
                return t.Pid(await h.create(req))
            case t.StartTask(id=cid, exec_id=exec_id):
                return t.Pid(await h.manager().start(cid, exec_id))
            case t.DeleteTask(id=cid, exec_id=exec_id):
                return await h.delete(cid, exec_id)
            case t.ExecTask():
                await h.manager().exec(req)
                return t.Done()
            case t.QueryState(id=cid, exec_id=exec_id):
                return h.manager().state(cid, exec_id)
            case t.QueryPids(id=cid):
                return await h.manager().pids(cid)
            case t.PauseTask(id=cid):
                await h.manager().pause(cid)
                return t.Done()
            case t.ResumeTask(id=cid):
                await h.manager().resume(cid)
                return t.Done()
            case t.CheckpointTask():
                raise Unimplemented("checkpoint is not supported by katapy: a VM sandbox cannot be checkpointed "
                                    "per container")
            case t.KillProcess():
                await h.manager().kill(req)
                return t.Done()
            case t.ResizePty():
                await h.manager().resize_pty(req)
                return t.Done()
            case t.CloseIO():
                h.manager().close_io(req)
                return t.Done()
            case t.UpdateTask():
                await h.manager().update(req)
                return t.Done()
            case t.WaitProcess(id=cid, exec_id=exec_id):
                return await h.manager().wait(cid, exec_id)
            case t.QueryStats(id=cid):
                return await h.manager().stats(cid)
            case t.ConnectShim():
                task_pid = h.containers.task_pid if h.containers is not None else 0
                return t.ConnectInfo(shim_pid=os.getpid(), task_pid=task_pid, version=__version__)
            case t.ShutdownShim(now=now):
                if h.has_containers and not now:
                    self._log.info("shutdown ignored: containers remain")
                    return t.Done()
                await h.stop_sandbox()
                self.shutdown_requested.set()
                return t.Done()
        raise TypeError(f"unknown task request {req!r}")
