"""The sandbox as the agent sees it: hostname, DNS, storages, containers, OOM events.

CreateSandbox must come first (Kata agent API); DestroySandbox removes every
container and unmounts the storages it mounted, newest first.

OOM events (GetOOMEvent) come from a watcher thread that polls each
container's OOM-kill counter (cgroup v2 memory.events, v1 memory.oom_control)
every OOM_POLL_S and queues the container id when it grows.  Polling keeps the
agent free of inotify/eventfd plumbing; the latency bound is OOM_POLL_S.
"""
from __future__ import annotations

import os
import queue
import socket
import threading

from katapy.agent import cgroups, log, storage
from katapy.agent.container import Containers
from katapy.ttrpc.errors import AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument

OOM_POLL_S = 0.25


class Sandbox:
    def __init__(self, containers: Containers, resolv_conf: str = "/etc/resolv.conf") -> None:
        self.containers = containers
        self.resolv_conf = resolv_conf
        self.sandbox_id: str | None = None
        self.hostname = ""
        self._mounts: list[str] = []
        self._lock = threading.Lock()
        self._oom_events: queue.Queue[str] = queue.Queue()
        self._oom_seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def create(self, sandbox_id: str, hostname: str, dns: list[str], storages: list[storage.Storage]) -> None:
        with self._lock:
            if self.sandbox_id is not None:
                raise AlreadyExists(f"sandbox {self.sandbox_id} already created")
            if hostname:
                if len(hostname) > 64 or "/" in hostname or "\0" in hostname:
                    raise InvalidArgument(f"invalid hostname {hostname!r}")
                socket.sethostname(hostname)
                self.hostname = hostname
            if dns:
                self._write_resolv_conf(dns)
            try:
                for s in storages:
                    storage.mount_storage(s)
                    self._mounts.append(s.mount_point)
            except BaseException:
                self._unmount_all()
                raise
            self.sandbox_id = sandbox_id or "sandbox"
        log.info("sandbox created", sandbox_id=self.sandbox_id, hostname=hostname, storages=len(storages))

    def _write_resolv_conf(self, dns: list[str]) -> None:
        """Kata's runtime sends resolv.conf lines ("nameserver 10.0.0.1", "search x")."""
        lines = []
        for entry in dns:
            if "\n" in entry or not entry.strip():
                raise InvalidArgument(f"invalid dns entry {entry!r}")
            lines.append(entry.strip() if " " in entry.strip() else f"nameserver {entry.strip()}")
        tmp = self.resolv_conf + ".katapy-tmp"
        try:
            with open(tmp, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, self.resolv_conf)
        except OSError as exc:
            raise Internal(f"writing {self.resolv_conf}: {exc}") from None

    def require(self) -> None:
        if self.sandbox_id is None:
            raise FailedPrecondition("CreateSandbox has not been called")

    def destroy(self) -> None:
        for c in self.containers.all():
            try:
                self.containers.remove(c.cid, 10)
            except Exception as exc:  # keep tearing down the rest
                log.error("container removal failed", cid=c.cid, error=exc)
        with self._lock:
            self._unmount_all()
            self.sandbox_id = None
        self._stop.set()
        log.info("sandbox destroyed")

    def _unmount_all(self) -> None:
        while self._mounts:
            target = self._mounts.pop()
            try:
                storage.umount(target)
            except OSError as exc:
                log.warning("unmount failed", target=target, error=exc)

    # --- OOM events -----------------------------------------------------------
    def watch_oom(self) -> None:
        """Start the OOM watcher (idempotent); called when a container is created."""
        with self._lock:
            if self._watcher is None or not self._watcher.is_alive():
                self._stop.clear()
                self._watcher = threading.Thread(target=self._watch_oom, name="oom-watcher", daemon=True)
                self._watcher.start()

    def _watch_oom(self) -> None:
        while not self._stop.wait(OOM_POLL_S):
            for c in self.containers.all():
                if c.cgroup is None:
                    continue
                count = cgroups.oom_kill_count(c.cgroup)
                if count is None:
                    continue
                before = self._oom_seen.setdefault(c.cid, count)
                if count > before:
                    self._oom_seen[c.cid] = count
                    log.info("oom kill", cid=c.cid, count=count)
                    self._oom_events.put(c.cid)

    def note_container(self, cid: str) -> None:
        """Record the current OOM counter of a new container so old kills are not reported."""
        c = self.containers.get(cid)
        if c.cgroup is not None:
            self._oom_seen[cid] = cgroups.oom_kill_count(c.cgroup) or 0
        self.watch_oom()

    def next_oom_event(self, timeout: float | None, cancelled: threading.Event | None = None) -> str:
        """Long poll: the id of the next container that had an OOM kill.

        Waits in slices so a caller that went away (``cancelled``) does not
        take an event that the next GetOOMEvent should get.
        """
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("GetOOMEvent cancelled: the caller is gone")
            left = OOM_POLL_S if deadline is None else min(OOM_POLL_S, deadline - time.monotonic())
            if left <= 0:
                raise DeadlineExceeded("no OOM event before the deadline")
            try:
                return self._oom_events.get(timeout=left)
            except queue.Empty:
                continue
