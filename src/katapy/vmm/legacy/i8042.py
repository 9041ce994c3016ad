"""The i8042 keyboard controller, reduced to what a guest kernel uses at 0x60 (data) / 0x64
(status on read, command on write): controller self-test and configuration byte, the output
port, and CPU reset — command 0xFE (pulse reset line), or output-port bit 0 cleared — which
ends the VM (Linux's ``reboot=k``; Firecracker's devices/legacy/i8042.rs does the same).
No keyboard is attached: device commands are not answered, so the guest's probe finds none.
"""
from __future__ import annotations

import collections
from typing import Callable

DATA_PORT = 0x60
COMMAND_PORT = 0x64
PORT_SPAN = 5  # 0x60..0x64 (0x61 belongs to the in-kernel PIT/speaker and is never routed here)

STATUS_OBF = 0x01  # output buffer full
STATUS_SYS = 0x04  # system flag: self-test passed
STATUS_CMD = 0x08  # last write was a command
STATUS_KEYLOCK = 0x10  # set: keyboard not inhibited (clear makes Linux warn "Keylock active")

CTR_KBD_DISABLED = 0x10
CTR_AUX_DISABLED = 0x20

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTP = 0xD0
CMD_WRITE_OUTP = 0xD1
CMD_RESET_CPU = 0xFE


class I8042:
    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self.status = STATUS_SYS | STATUS_KEYLOCK
        self.ctr = 0x45  # kbd interrupt on, system flag, translation
        self.outp = 0x01  # bit 0 = reset line inactive
        self._pending_cmd: int | None = None
        self._out: collections.deque[int] = collections.deque(maxlen=16)

    def read(self, offset: int, length: int) -> bytes:
        port = DATA_PORT + offset
        if port == COMMAND_PORT:
            value = self.status | (STATUS_OBF if self._out else 0)
        elif port == DATA_PORT:
            value = self._out.popleft() if self._out else 0
        else:
            value = 0xFF
        return bytes([value]) + b"\0" * (length - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        port, value = DATA_PORT + offset, data[0]
        if port == COMMAND_PORT:
            self.status |= STATUS_CMD
            self._command(value)
        elif port == DATA_PORT:
            self.status &= ~STATUS_CMD
            cmd, self._pending_cmd = self._pending_cmd, None
            if cmd == CMD_WRITE_CTR:
                self.ctr = value
            elif cmd == CMD_WRITE_OUTP:
                self.outp = value
                if not value & 0x01:
                    self._on_reset()

    def _command(self, cmd: int) -> None:
        if cmd == CMD_READ_CTR:
            self._out.append(self.ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTP):
            self._pending_cmd = cmd
        elif cmd == CMD_SELF_TEST:
            self._out.append(0x55)
        elif cmd in (CMD_TEST_KBD, CMD_TEST_AUX):
            self._out.append(0x00)
        elif cmd == CMD_READ_OUTP:
            self._out.append(self.outp)
        elif cmd == CMD_RESET_CPU:
            self._on_reset()
        elif cmd == CMD_DISABLE_AUX:  # the port enable bits live in the configuration byte
            self.ctr |= CTR_AUX_DISABLED
        elif cmd == CMD_ENABLE_AUX:
            self.ctr &= ~CTR_AUX_DISABLED
        elif cmd == CMD_DISABLE_KBD:
            self.ctr |= CTR_KBD_DISABLED
        elif cmd == CMD_ENABLE_KBD:
            self.ctr &= ~CTR_KBD_DISABLED
        # anything else: accepted, no reply
