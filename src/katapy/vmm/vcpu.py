"""vCPU threads: each runs KVM_RUN in its own thread (GIL released) and routes exits to the buses.

Stopping and pausing use the kick protocol from api.rst (KVM_RUN,
"immediate_exit"): the requester first records what it wants, then sets
``kvm_run.immediate_exit`` and sends the thread a real-time signal whose
handler does nothing.  Either the signal interrupts a KVM_RUN in progress
(EINTR) or immediate_exit makes the next one return at once, so a request
can never be lost in the window before the thread enters the guest.  The
thread clears immediate_exit only after KVM_RUN has returned EINTR, and
then looks at its requests again.

Exits: port I/O and MMIO go to the buses (a device that raises is logged and
reads as all-ones: a device bug never kills a vCPU); HLT (only seen without
an in-kernel LAPIC) parks this vCPU; shutdown, system events and errors end
the VM through ``on_exit``.

Every return of KVM_RUN is counted by reason (:data:`EXIT_REASONS`) in the
thread's own list of ints, one ``+= 1`` per exit: no lock, nothing allocated.
Other threads read the list as it is (a metrics scrape: each int is read
whole under the GIL, and only ever grows); ``Vmm.exit_counts`` sums them.

The thread loads its seccomp filter (``katapy.vmm.seccomp``, the vCPU list)
first thing in ``_run``: the vCPU fd and its kvm_run mapping already exist,
and from then on the thread only runs the guest and its exits.
"""
from __future__ import annotations

import collections
import signal
import threading
from typing import Callable

from katapy import log
from katapy.vmm import seccomp
from katapy.vmm.bus import Bus
from katapy.vmm.kvm import exits
from katapy.vmm.kvm.consts import (
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    install_kick_signal,
)
from katapy.vmm.kvm.vcpu import VcpuFd
from katapy.vmm.state import ExitReason, VmExit

_log = log.get("vmm.vcpu")

KICK_SIGNAL = signal.SIGRTMIN + 4
RECENT_EXITS = 6

#: the names exits are counted under (``katapy_hypervisor_vm_exits_total{reason}``), in slot order
EXIT_REASONS = (
    "io_in", "io_out", "mmio_read", "mmio_write", "hlt", "shutdown", "system_event", "ioapic_eoi",
    "internal_error", "fail_entry", "interrupted", "unknown",
)
#: each exit type's slot in a thread's ``exits`` list; every member of ``exits.VcpuExit`` has one
_EXIT_SLOT: dict[type, int] = {
    cls: EXIT_REASONS.index(name)
    for cls, name in (
        (exits.IoIn, "io_in"), (exits.IoOut, "io_out"), (exits.MmioRead, "mmio_read"),
        (exits.MmioWrite, "mmio_write"), (exits.Hlt, "hlt"), (exits.Shutdown, "shutdown"),
        (exits.SystemEvent, "system_event"), (exits.IoapicEoi, "ioapic_eoi"),
        (exits.InternalError, "internal_error"), (exits.FailEntry, "fail_entry"),
        (exits.Interrupted, "interrupted"), (exits.Unknown, "unknown"),
    )
}
_INTERRUPTED = _EXIT_SLOT[exits.Interrupted]
_kick_installed = False
_kick_lock = threading.Lock()


def _ensure_kick_handler() -> None:
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            install_kick_signal(KICK_SIGNAL)
            _kick_installed = True


class VcpuThread:
    def __init__(
        self,
        vcpu: VcpuFd,
        pio_bus: Bus,
        mmio_bus: Bus,
        on_exit: Callable[[VmExit], None],
        on_halt: Callable[[int], None] | None = None,
    ):
        self.vcpu = vcpu
        self.index = vcpu.index
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self._on_exit = on_exit
        self._on_halt = on_halt or (lambda index: None)
        self._cond = threading.Condition()
        self._stop = False
        self._pause = False
        self.paused = False
        #: KVM_RUN returns by reason, indexed like EXIT_REASONS; written only by this vCPU's thread
        self.exits: list[int] = [0] * len(EXIT_REASONS)
        # the last device accesses, named in a triple fault's report (SVM resets the vCPU's registers on
        # shutdown, so they are the best clue to where the guest was)
        self.recent: collections.deque[tuple[str, int]] = collections.deque(maxlen=RECENT_EXITS)
        self._thread: threading.Thread | None = None
        _ensure_kick_handler()

    # -- control (from other threads) ------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"katapy-vcpu{self.index}", daemon=True)
        self._thread.start()

    def _kick(self) -> None:
        self.vcpu.set_immediate_exit(True)
        t = self._thread
        if t is not None and t.is_alive() and t.ident is not None:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def pause(self, timeout: float = 5.0) -> bool:
        """Ask the vCPU to leave the guest and wait there; True once it is parked."""
        with self._cond:
            if not self.alive:
                return True
            self._pause = True
        self._kick()
        with self._cond:
            return self._cond.wait_for(lambda: self.paused or not self.alive, timeout)

    def resume(self) -> None:
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._kick()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def exit_count(self) -> int:
        """Guest exits so far (KVM_RUN returns that were not a kick)."""
        return sum(self.exits) - self.exits[_INTERRUPTED]

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the thread ---------------------------------------------------------------
    def _wait_while_paused(self) -> bool:
        """Park while a pause is requested; False when the thread must end."""
        with self._cond:
            while self._pause and not self._stop:
                self.paused = True
                self._cond.notify_all()
                self._cond.wait()
            self.paused = False
            return not self._stop

    def _run(self) -> None:
        counts, slot_of = self.exits, _EXIT_SLOT
        try:
            seccomp.install(seccomp.ThreadClass.VCPU)  # setup is done: vCPU fd and kvm_run mapped
            while self._wait_while_paused():
                exit_ = self.vcpu.run()
                slot = slot_of[type(exit_)]
                counts[slot] += 1
                if slot == _INTERRUPTED:
                    self.vcpu.set_immediate_exit(False)
                    continue
                outcome = self._handle(exit_)
                if outcome is not None:
                    if outcome.reason is ExitReason.HALTED:
                        self._on_halt(self.index)
                    else:
                        self._on_exit(outcome)
                    return
        except Exception as exc:
            _log.error("vCPU thread failed", vcpu=self.index, error=repr(exc), exc_info=True)
            self._on_exit(VmExit(ExitReason.ERROR, f"vCPU {self.index}: {exc!r}", self.index))
        finally:
            with self._cond:
                self.paused = False
                self._cond.notify_all()

    def _handle(self, e: exits.VcpuExit) -> VmExit | None:
        match e:
            case exits.IoOut(port=port, size=size, data=data, count=count):
                self.recent.append(("out", port))  # formatted only for a report
                for i in range(count):
                    self._safe_write(self.pio_bus, port, data[i * size : (i + 1) * size])
            case exits.IoIn(port=port, size=size, count=count):
                self.recent.append(("in", port))  # formatted only for a report
                self.vcpu.complete_io_in(b"".join(self._safe_read(self.pio_bus, port, size) for _ in range(count)))
            case exits.MmioWrite(addr=addr, data=data):
                self.recent.append(("mmio-w", addr))  # formatted only for a report
                self._safe_write(self.mmio_bus, addr, data)
            case exits.MmioRead(addr=addr, length=length):
                self.recent.append(("mmio-r", addr))  # formatted only for a report
                self.vcpu.complete_mmio_read(self._safe_read(self.mmio_bus, addr, length))
            case exits.Hlt():
                return VmExit(ExitReason.HALTED, "HLT", self.index)
            case exits.Shutdown():
                recent = ", ".join(f"{kind} {addr:#x}" for kind, addr in self.recent) or "none"
                return VmExit(ExitReason.TRIPLE_FAULT,
                              f"KVM_EXIT_SHUTDOWN on vCPU {self.index} after {self.exit_count} exits "
                              f"(last device accesses: {recent})", self.index)
            case exits.SystemEvent(kind=kind):
                reason = {
                    KVM_SYSTEM_EVENT_SHUTDOWN: ExitReason.POWEROFF,
                    KVM_SYSTEM_EVENT_RESET: ExitReason.RESET,
                    KVM_SYSTEM_EVENT_CRASH: ExitReason.CRASH,
                }.get(kind, ExitReason.ERROR)
                return VmExit(reason, f"KVM_EXIT_SYSTEM_EVENT type {kind}", self.index)
            case exits.IoapicEoi():
                pass  # katapy's IOAPIC routes every pin as an edge (legacy/ioapic.py): nothing to re-deliver
            case exits.InternalError(suberror=sub, data=data):
                rip = self._rip()
                return VmExit(ExitReason.ERROR, f"KVM internal error suberror={sub} data={data} rip={rip}", self.index)
            case exits.FailEntry(reason=reason, cpu=cpu):
                return VmExit(ExitReason.ERROR, f"VM entry failed: reason={reason:#x} cpu={cpu}", self.index)
            case exits.Unknown(reason=reason, hardware_reason=hw):
                return VmExit(ExitReason.ERROR, f"unhandled exit reason {reason} (hw {hw:#x})", self.index)
        return None

    def _rip(self) -> str:
        try:
            return hex(self.vcpu.get_regs().rip)
        except OSError:
            return "?"

    def _safe_read(self, bus: Bus, addr: int, length: int) -> bytes:
        try:
            return bus.read(addr, length)
        except Exception as exc:
            _log.error("device read failed", bus=bus.name, addr=hex(addr), error=repr(exc), exc_info=True)
            return b"\xff" * length

    def _safe_write(self, bus: Bus, addr: int, data: bytes) -> None:
        try:
            bus.write(addr, data)
        except Exception as exc:
            _log.error("device write failed", bus=bus.name, addr=hex(addr), error=repr(exc), exc_info=True)
