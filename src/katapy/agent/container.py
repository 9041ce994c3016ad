"""Containers in the sandbox: crun bundles under the agent's state directory.

Lifecycle (runtime-spec runtime.md "Lifecycle", Kata agent API):
CreateContainer writes ``<state>/<cid>/config.json`` and runs ``crun create``
(the init process exists, stopped before exec); StartContainer runs
``crun start``; ExecProcess runs ``crun exec --detach`` with a process.json;
RemoveContainer kills everything, runs ``crun delete --force`` and frees the
bundle.  Each process keeps its stdio (pipes or a pty master) in the agent
until the container is removed, so output can be drained after exit.
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from katapy.agent import cgroups, log, namespaces
from katapy.agent.crun import Crun, CrunError
from katapy.agent.process import Process, read_pid_file
from katapy.agent.reaper import Reaper
from katapy.agent.stdio import ProcessIO
from katapy.ttrpc.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)

# Container and exec ids become path components and crun arguments.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    if not _ID.match(value):
        raise InvalidArgument(f"invalid {kind} {value!r}: want 1-128 of [A-Za-z0-9_.+-], not starting with a symbol")
    return value


@dataclass
class Container:
    cid: str
    bundle: str
    init: Process
    status: str = "created"  # created | running | paused | stopped
    cgroup: cgroups.CgroupPaths | None = None
    execs: dict[str, Process] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def process(self, exec_id: str) -> Process:
        """The init process for "" or its own exec id / the container id, else the exec'd one."""
        if exec_id in ("", self.cid, self.init.exec_id):
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"process {exec_id!r} not found in container {self.cid}")
        return proc


class Containers:
    """Every container of the sandbox, by id."""

    def __init__(self, reaper: Reaper, state_dir: str, crun: Crun) -> None:
        self.reaper = reaper
        self.state_dir = state_dir
        self.crun = crun
        self._lock = threading.Lock()
        self._containers: dict[str, Container] = {}
        os.makedirs(state_dir, mode=0o700, exist_ok=True)

    def get(self, cid: str) -> Container:
        with self._lock:
            found = self._containers.get(cid)
        if found is None:
            raise NotFound(f"container {cid!r} not found")
        return found

    def _init_pid_of(self, cid: str) -> int | None:
        """The guest pid of a container's init while it lives (a namespace to join), else None."""
        c = self.get(cid)
        return c.init.pid if c.init.pid and c.init.exit_code() is None else None

    def all(self) -> list[Container]:
        with self._lock:
            return list(self._containers.values())

    # --- lifecycle ----------------------------------------------------------
    def create(self, cid: str, exec_id: str, config: dict[str, Any]) -> Container:
        import json

        check_id("container id", cid)
        exec_id = check_id("exec id", exec_id) if exec_id else cid
        root = config.get("root", {}).get("path", "")
        if not os.path.isdir(root):
            raise InvalidArgument(f"container {cid}: root.path {root!r} is not a directory in the guest")
        namespaces.resolve_joins(config, self._init_pid_of)
        namespaces.apply_vm_netns_sysctls(config)
        bundle = os.path.join(self.state_dir, cid)
        with self._lock:
            if cid in self._containers:
                raise AlreadyExists(f"container {cid!r} already exists")
            try:
                os.mkdir(bundle, 0o700)
            except FileExistsError:
                raise AlreadyExists(f"container {cid!r}: bundle {bundle} already exists") from None
            # Reserve the id while crun runs (outside the lock).
            self._containers[cid] = placeholder = Container(cid, bundle, Process(exec_id, ProcessIO(False)))
        try:
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(config, f)
            terminal = bool(config["process"].get("terminal"))

            def create(pid_file: str, fds: dict[int, int], console: str | None) -> None:
                self.crun.create(cid, bundle, pid_file, fds, console)

            try:
                init = self._spawn(bundle, exec_id, "init", terminal, create, f"container {cid}")
            except Internal:
                self._force_delete(cid, bundle)
                raise
            container = Container(cid, bundle, init)
            try:
                container.cgroup = cgroups.paths_for_pid(init.pid)
            except OSError as exc:
                log.warning("container cgroup not found", cid=cid, error=exc)
        except BaseException:
            with self._lock:
                self._containers.pop(cid, None)
            _remove_tree(bundle)
            raise
        with self._lock:
            if self._containers.get(cid) is placeholder:
                self._containers[cid] = container
        log.info("container created", cid=cid, pid=init.pid, terminal=init.terminal)
        return container

    def _spawn(self, bundle: str, exec_id: str, name: str, terminal: bool,
               run_crun: Callable[[str, dict[int, int], str | None], None], what: str) -> Process:
        """Prepare stdio, run crun create/exec (``run_crun(pid_file, fds, console_socket)``), adopt the pid."""
        io = ProcessIO(terminal)
        io.prepare(bundle, name)
        pid_file = os.path.join(bundle, f"{name}.pid")
        try:
            run_crun(pid_file, dict(io.child_fds), io.console_path)
        except CrunError as exc:
            io.after_spawn(False)
            io.close()
            raise InvalidArgument(f"{what}: {exc}") from None
        try:
            io.after_spawn(True)
            proc = Process(exec_id, io, terminal=terminal)
            proc.attach(self.reaper, read_pid_file(pid_file))
        except (OSError, ValueError) as exc:
            io.close()
            raise Internal(f"{what}: {exc}") from None
        return proc

    def start(self, cid: str) -> int:
        c = self.get(cid)
        with c.lock:
            if c.status != "created":
                raise FailedPrecondition(f"container {cid} is {c.status}, not created")
            try:
                self.crun.start(cid, c.bundle)
            except CrunError as exc:
                raise Internal(f"container {cid}: {exc}") from None
            c.status = "running"
        log.info("container started", cid=cid, pid=c.init.pid)
        return c.init.pid

    def exec(self, cid: str, exec_id: str, process: dict[str, Any]) -> Process:
        import json

        check_id("exec id", exec_id)
        c = self.get(cid)
        with c.lock:
            if exec_id in c.execs or exec_id in (cid, c.init.exec_id):
                raise AlreadyExists(f"exec id {exec_id!r} already exists in container {cid}")
            if c.status not in ("running",) or c.init.exit_code() is not None:
                raise FailedPrecondition(f"container {cid} is not running")
            process_json = os.path.join(c.bundle, f"exec-{exec_id}.json")
            with open(process_json, "w") as f:
                json.dump(process, f)
            bundle = c.bundle

            def run_exec(pid_file: str, fds: dict[int, int], console: str | None) -> None:
                self.crun.exec(cid, bundle, process_json, pid_file, fds, console)

            proc = self._spawn(bundle, exec_id, f"exec-{exec_id}", bool(process.get("terminal")), run_exec,
                               f"exec {exec_id} in {cid}")
            c.execs[exec_id] = proc
        log.info("process executed", cid=cid, exec_id=exec_id, pid=proc.pid)
        return proc

    def signal(self, cid: str, exec_id: str, signum: int) -> None:
        c = self.get(cid)
        if not 0 < signum < 65:
            raise InvalidArgument(f"invalid signal {signum}")
        if exec_id == "":
            try:
                self.crun.kill(cid, c.bundle, signum, all_processes=True)
            except CrunError as exc:
                raise NotFound(f"container {cid}: {exc}") from None
            return
        proc = c.process(exec_id)
        if proc is c.init and c.status == "created":
            raise FailedPrecondition(f"container {cid} is not started")
        try:
            proc.signal(signum)
        except ProcessLookupError:
            raise NotFound(f"process {exec_id} in {cid}: process already finished") from None

    def wait(self, cid: str, exec_id: str, deadline: float | None) -> int:
        proc = self.get(cid).process(exec_id)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        code = proc.wait(timeout)
        if code is None:
            raise DeadlineExceeded(f"process {exec_id} in {cid} still running")
        c = self.get(cid)
        if proc is c.init:
            c.status = "stopped"
        return code

    def remove(self, cid: str, timeout_s: int) -> None:
        c = self.get(cid)
        with c.lock:
            if c.init.exit_code() is None:
                if c.status == "paused":
                    self._try(self.crun.resume, cid, c.bundle)
                self._try(self.crun.kill, cid, c.bundle, 9, True)
                if c.init.wait(float(timeout_s) if timeout_s else None) is None:
                    raise DeadlineExceeded(f"container {cid}: processes still running after {timeout_s}s")
            self._force_delete(cid, c.bundle)
            for proc in [c.init, *c.execs.values()]:
                proc.release()
            with self._lock:
                self._containers.pop(cid, None)
            _remove_tree(c.bundle)
        log.info("container removed", cid=cid)

    def _force_delete(self, cid: str, bundle: str) -> None:
        try:
            self.crun.delete(cid, bundle)
        except CrunError as exc:
            log.warning("crun delete failed", cid=cid, error=exc.message)

    def _try(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except CrunError as exc:
            log.debug("crun call failed", verb=exc.verb, error=exc.message)

    # --- resources -----------------------------------------------------------
    def pause(self, cid: str) -> None:
        c = self.get(cid)
        with c.lock:
            try:
                self.crun.pause(cid, c.bundle)
            except CrunError as exc:
                raise FailedPrecondition(f"container {cid}: {exc}") from None
            c.status = "paused"

    def resume(self, cid: str) -> None:
        c = self.get(cid)
        with c.lock:
            try:
                self.crun.resume(cid, c.bundle)
            except CrunError as exc:
                raise FailedPrecondition(f"container {cid}: {exc}") from None
            c.status = "running"

    def update(self, cid: str, resources: dict[str, Any]) -> None:
        import json

        c = self.get(cid)
        path = os.path.join(c.bundle, "update-resources.json")
        with open(path, "w") as f:
            json.dump(resources, f)
        try:
            self.crun.update(cid, c.bundle, path)
        except CrunError as exc:
            raise InvalidArgument(f"container {cid}: {exc}") from None

    def processes(self, cid: str) -> list[tuple[int, str | None]]:
        """Every process in the container's cgroup (children and orphans too), sorted by pid: (pid, "" for
        init, the exec id of an exec, None for the others)."""
        c = self.get(cid)
        if c.cgroup is None:
            raise FailedPrecondition(f"container {cid}: cgroup unknown")
        known = {p.pid: exec_id for exec_id, p in c.execs.items() if p.pid}
        if c.init.pid:
            known[c.init.pid] = ""
        return [(pid, known.get(pid)) for pid in cgroups.pids(c.cgroup)]

    def stats(self, cid: str) -> cgroups.Stats:
        c = self.get(cid)
        if c.cgroup is None:
            raise FailedPrecondition(f"container {cid}: cgroup unknown")
        return cgroups.read_stats(c.cgroup)


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
