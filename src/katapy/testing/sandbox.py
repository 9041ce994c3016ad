"""Start a sandbox VM and its agent connection, for tests and ``katapy sandbox``.

Three ways in, all of which always stop the VM and remove what they made:

* ``async with sandbox_vm(...) as sb:`` inside trio code; ``sb`` unpacks as
  ``(hypervisor, agent, shared_dir)`` and also carries ``sb.times``;
* ``SandboxThread(...)``: the same VM owned by a trio loop in a background
  thread, so synchronous pytest tests can share one VM (a boot under TCG
  takes seconds): ``st.run(async_fn, *args)`` runs ``async_fn(sandbox, *args)``
  in that loop;
* the pytest fixtures ``katapy_sandbox`` (a shared, session-wide
  SandboxThread, restarted if a test killed it) and ``katapy_fresh_sandbox``
  (one VM for one test).  Use them with
  ``pytest_plugins = ["katapy.testing.sandbox"]`` in a conftest.

``missing_requirements()`` says why no sandbox can start here (guest kernel
or image not built, a device back end or QEMU missing); the fixtures skip with
that reason.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from katapy import config as kconfig
from katapy import hypervisor, log
from katapy.hypervisor.base import Hypervisor
from katapy.shim.agent_dial import dial_agent

_log = log.get("testing.sandbox")
T = TypeVar("T")


@dataclass
class Sandbox:
    hypervisor: Hypervisor
    agent: Any  # katapy.agent_client.AgentClient
    shared_dir: Path
    times: dict[str, float] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:  # (hypervisor, agent, shared_dir)
        return iter((self.hypervisor, self.agent, self.shared_dir))


def missing_requirements(config: kconfig.KatapyConfig | None = None, backend: str | None = None) -> str | None:
    """Why a sandbox VM cannot start on this host with this configuration, or None if it can."""
    cfg = config or kconfig.load(check_files=False)
    problems = kconfig.file_problems(cfg)
    if problems:
        return "; ".join(problems)
    decision = hypervisor.decide(backend or cfg.hypervisor.name)
    needed = [("katapy.vmm.virtio.vsock", "VsockDevice"), ("katapy.agent_client", "AgentClient")]
    if cfg.hypervisor.shared_fs == "virtio-fs":
        needed.append(("katapy.vmm.virtio.fs", "FsDevice"))
    if decision.name == "qemu":
        needed.append(("katapy.vmm.virtio.vhost_user", "VhostUserServer"))
        if not os.access(cfg.hypervisor.path, os.X_OK):
            return f"QEMU binary {cfg.hypervisor.path} is missing"
    else:
        if not decision.kvm_flavor.startswith("hardware"):
            return f"the builtin backend needs hardware KVM; this host's KVM is {decision.kvm_flavor}"
        needed.append(("katapy.vmm.api", "Vmm"))
    for module, name in needed:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            return f"{module}.{name} is not available: {exc}"
    return None


@asynccontextmanager
async def sandbox_vm(
    config: kconfig.KatapyConfig | None = None,
    backend: str | None = None,
    shared_dir: Path | None = None,
    state_root: Path | None = None,
    sandbox_id: str | None = None,
    kernel_params: str = "",
) -> AsyncIterator[Sandbox]:
    """Boot a sandbox VM with the configured (or ``backend``-forced) hypervisor and connect its agent.

    ``state_root`` defaults to a fresh directory under /tmp (short, for unix
    socket paths); ``shared_dir`` to a fresh temporary directory.  Everything
    made here is removed on exit, whatever happened.
    """
    cfg = config or kconfig.load()
    sid = sandbox_id or f"sb-{uuid.uuid4().hex[:12]}"
    made: list[Path] = []
    if state_root is None:
        state_root = Path(tempfile.mkdtemp(prefix="katapy-", dir="/tmp"))
        made.append(state_root)
    if shared_dir is None:
        shared_dir = Path(tempfile.mkdtemp(prefix="katapy-shared-"))
        made.append(shared_dir)
    hv = hypervisor.select(cfg, name=backend)
    times: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        vm = hypervisor.vm_config(cfg, sid, shared_dir=shared_dir, state_dir=state_root / sid,
                                  kernel_params=kernel_params)
        await hv.start_vm(vm)
        times["vm_start_s"] = time.monotonic() - t0
        connected = await dial_agent(hv, cfg.agent.port, cfg.agent.dial_timeout, vm.console_path)
        # the client serves its ttrpc connection from a nursery: enter and leave it as one block
        async with connected as agent:
            times["agent_ready_s"] = time.monotonic() - t0
            _log.info("sandbox ready", sandbox=sid, backend=hv.name, **times)
            yield Sandbox(hv, agent, shared_dir, times)
    finally:
        with trio.CancelScope(shield=True):
            t1 = time.monotonic()
            try:
                await hv.stop_vm()
            except Exception as exc:
                _log.error("stop_vm failed; cleaning up anyway", error=repr(exc))
            await hv.cleanup()
            times["stop_s"] = time.monotonic() - t1
            for p in made:
                shutil.rmtree(p, ignore_errors=True)


class SandboxThread:
    """A sandbox VM owned by a trio loop in a background thread (shareable across sync tests)."""

    def __init__(self, **sandbox_args: Any):
        self._args = sandbox_args
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self.sandbox: Sandbox | None = None
        self._thread = threading.Thread(target=self._main, name="katapy-sandbox", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the constructor or to close()
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with sandbox_vm(**self._args) as sb:
            self.sandbox = sb
            self._ready.set()
            await self._stop.wait()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(sandbox, *args)`` in the sandbox's trio loop and return its result."""
        if self.sandbox is None or self._token is None:
            raise RuntimeError("the sandbox is not running")
        return trio.from_thread.run(fn, self.sandbox, *args, trio_token=self._token)

    def alive(self) -> bool:
        return self.sandbox is not None and self._thread.is_alive() and self.sandbox.hypervisor.state().value == "running"

    def close(self) -> None:
        """Stop the VM and the loop; re-raises what went wrong in the thread, if anything."""
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=60)
        if self._error is not None:
            raise self._error


# -- pytest fixtures (pytest_plugins = ["katapy.testing.sandbox"]) ------------------------------
try:
    import pytest
except ImportError:  # pytest is a test dependency only
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def _skip_unless_possible() -> None:
        reason = missing_requirements()
        if reason:
            pytest.skip(f"cannot start a sandbox VM: {reason}")

    @pytest.fixture(scope="session")
    def _katapy_shared_sandbox() -> Iterator[list[SandboxThread]]:
        holder: list[SandboxThread] = []
        yield holder
        for st in holder:
            st.close()

    @pytest.fixture
    def katapy_sandbox(_katapy_shared_sandbox: list[SandboxThread]) -> SandboxThread:
        """One sandbox VM shared by the whole session (restarted if a test ended it)."""
        _skip_unless_possible()
        if _katapy_shared_sandbox and not _katapy_shared_sandbox[0].alive():
            try:
                _katapy_shared_sandbox.pop().close()
            except Exception as exc:
                _log.warning("previous shared sandbox ended badly", error=repr(exc))
        if not _katapy_shared_sandbox:
            _katapy_shared_sandbox.append(SandboxThread())
        return _katapy_shared_sandbox[0]

    @pytest.fixture
    def katapy_fresh_sandbox() -> Iterator[SandboxThread]:
        """A sandbox VM for this test alone."""
        _skip_unless_possible()
        st = SandboxThread()
        yield st
        st.close()
