"""katapy.shim.agent_dial: a dial that times out while the VM still runs says where the guest was; a VM
that ends first fails the dial at once, with its exit."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import trio

from katapy.hypervisor.base import VmExit
from katapy.shim.agent_dial import VmEndedBeforeAgent, console_notes, console_tail, dial_agent
from katapy.ttrpc.errors import Unavailable


class RunningVm:
    """A VM as dial_agent sees it: a hybrid-vsock socket that takes connections and never answers CONNECT
    (a guest that is not listening yet), and an exit that never comes."""

    def __init__(self, path, exit_after=None):
        self.path = path
        self.exit_after = exit_after
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(64)
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            conn.recv(64)
            conn.close()  # as the VMM does when the guest has no listener on the port

    def agent_socket(self):
        return self.path

    async def wait_exit(self):
        if self.exit_after is None:
            await trio.sleep_forever()
        await trio.sleep(self.exit_after)
        return VmExit("guest-reset", "triple fault on vCPU 0", console_tail="[ 1.0] last words before the reset\n")

    def close(self):
        self.stop = True
        self.srv.close()


def test_a_dial_timeout_carries_the_end_of_the_console(tmp_path):
    console = tmp_path / "console.log"
    console.write_text("".join(f"[ {i}.0] boot line {i}\n" for i in range(500)) + "[ 9.9] last words\n")
    vm = RunningVm(tmp_path / "vsock.sock")
    try:
        with pytest.raises(Unavailable) as info:
            trio.run(dial_agent, vm, 1024, 1.0, console)
    finally:
        vm.close()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "the VM still runs" in notes and "last words" in notes and "boot line 499" in notes
    assert "boot line 1\n" not in notes  # only the tail
    assert console_notes(info.value).endswith("[ 9.9] last words\n")


def test_a_vm_that_ends_first_fails_the_dial_at_once(tmp_path):
    vm = RunningVm(tmp_path / "vsock.sock", exit_after=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(VmEndedBeforeAgent) as info:
            trio.run(dial_agent, vm, 1024, 30.0, tmp_path / "console.log")
        elapsed = time.monotonic() - t0
    finally:
        vm.close()
    assert elapsed < 10, f"the dial went on {elapsed:.1f} s after the VM had ended"
    assert info.value.vm_exit.reason == "guest-reset"
    assert "triple fault on vCPU 0" in str(info.value) and "last words before the reset" in str(info.value)
    assert console_notes(info.value) == ""


def test_console_tail_of_a_missing_log_is_empty(tmp_path):
    assert console_tail(tmp_path / "nothing.log") == "" and console_tail(None) == ""
