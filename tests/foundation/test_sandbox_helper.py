"""katapy.testing.sandbox.connect_agent: a dial that times out while the VM still runs says where the guest was."""
from __future__ import annotations

import socket
import threading

import pytest
import trio

from katapy.testing.sandbox import connect_agent, console_tail
from katapy.ttrpc.errors import Unavailable


class RunningVm:
    """A VM as connect_agent sees it: a hybrid-vsock socket that takes connections and never answers CONNECT
    (a guest that is not listening yet), and an exit that never comes."""

    def __init__(self, path):
        self.path = path
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
        await trio.sleep_forever()

    def close(self):
        self.stop = True
        self.srv.close()


def test_a_dial_timeout_carries_the_end_of_the_console(tmp_path):
    console = tmp_path / "console.log"
    console.write_text("".join(f"[ {i}.0] boot line {i}\n" for i in range(500)) + "[ 9.9] last words\n")
    vm = RunningVm(tmp_path / "vsock.sock")
    try:
        with pytest.raises(Unavailable) as info:
            trio.run(connect_agent, vm, 1024, 1.0, console)
    finally:
        vm.close()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "the VM still runs" in notes and "last words" in notes and "boot line 499" in notes
    assert "boot line 1\n" not in notes  # only the tail


def test_console_tail_of_a_missing_log_is_empty(tmp_path):
    assert console_tail(tmp_path / "nothing.log") == "" and console_tail(None) == ""
