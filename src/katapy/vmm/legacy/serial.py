"""A 16550A-compatible UART (the 8250 family) at COM1 = 0x3f8, IRQ 4.

Register file per the National Semiconductor PC16550D data sheet (table 2):
offset 0 RBR/THR (DLL when LCR.DLAB), 1 IER (DLM when DLAB), 2 IIR/FCR, 3 LCR,
4 MCR, 5 LSR, 6 MSR, 7 SCR.  Transmission is instantaneous, so THR is always
empty (LSR.THRE|TEMT); a THR write raises the THR-empty interrupt when IER
asks for it, input bytes raise the received-data interrupt.  MCR loopback
mirrors the modem-control bits into MSR and THR into RBR, which is how
Linux's 8250 driver identifies the chip.  The interrupt is an edge on the
IOAPIC pin, delivered through ``trigger`` (an irqfd write in the VMM).
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Callable

DATA, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDA, IER_THRE = 0x01, 0x02
IIR_NONE, IIR_THRE, IIR_RDA, IIR_FIFO_BITS = 0x01, 0x02, 0x04, 0xC0
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
INPUT_BUFFER_MAX = 64 * 1024

COM1_PORT = 0x3F8
COM1_IRQ = 4


class Serial:
    def __init__(self, output: Callable[[bytes], None] | None = None, trigger: Callable[[], None] | None = None):
        self._output = output or (lambda data: None)
        self._trigger = trigger or (lambda: None)
        self._lock = threading.Lock()  # input arrives from host threads
        self._input: collections.deque[int] = collections.deque()
        self.ier = 0
        self.iir = IIR_NONE
        self.lcr = 0x03  # 8N1
        self.mcr = MCR_OUT2
        self.scr = 0
        self.dll, self.dlm = 0x0C, 0x00  # 9600 baud

    # -- host side ----------------------------------------------------------------
    def set_output(self, output: Callable[[bytes], None]) -> None:
        self._output = output

    def enqueue_input(self, data: bytes) -> int:
        """Bytes typed at the console; returns how many were accepted."""
        with self._lock:
            room = INPUT_BUFFER_MAX - len(self._input)
            self._input.extend(data[:room])
            accepted = min(room, len(data))
            fire = accepted > 0 and self.ier & IER_RDA
            if fire:
                self.iir = IIR_RDA
        if fire:
            self._trigger()
        return accepted

    # -- guest side (bus device) ---------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return bytes([self._read(offset)]) + b"\0" * (length - 1)

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self._write(offset, data[0])

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        with self._lock:
            if offset == DATA:
                if dlab:
                    return self.dll
                value = self._input.popleft() if self._input else 0
                if not self._input and self.iir == IIR_RDA:
                    self.iir = IIR_NONE
                return value
            if offset == IER:
                return self.dlm if dlab else self.ier
            if offset == IIR:
                value = self.iir | IIR_FIFO_BITS
                if self.iir == IIR_THRE:
                    self.iir = IIR_NONE  # reading IIR clears the THR-empty interrupt
                return value
            if offset == LCR:
                return self.lcr
            if offset == MCR:
                return self.mcr
            if offset == LSR:
                return LSR_THRE | LSR_TEMT | (LSR_DR if self._input else 0)
            if offset == MSR:
                if self.mcr & MCR_LOOP:
                    m = self.mcr
                    return (
                        (MSR_CTS if m & MCR_RTS else 0)
                        | (MSR_DSR if m & MCR_DTR else 0)
                        | (MSR_RI if m & MCR_OUT1 else 0)
                        | (MSR_DCD if m & MCR_OUT2 else 0)
                    )
                return MSR_DCD | MSR_DSR | MSR_CTS
            if offset == SCR:
                return self.scr
        return 0xFF

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        fire = False
        out = None
        with self._lock:
            if offset == DATA:
                if dlab:
                    self.dll = value
                elif self.mcr & MCR_LOOP:
                    if len(self._input) < INPUT_BUFFER_MAX:
                        self._input.append(value)
                    if self.ier & IER_RDA:
                        self.iir, fire = IIR_RDA, True
                else:
                    out = bytes([value])
                    if self.ier & IER_THRE:
                        self.iir, fire = IIR_THRE, True
            elif offset == IER:
                if dlab:
                    self.dlm = value
                else:
                    old = self.ier
                    self.ier = value & 0x0F
                    # Enabling THRE with an empty THR interrupts at once (16550 behaviour Linux tests for).
                    if self.ier & IER_THRE and not old & IER_THRE:
                        self.iir, fire = IIR_THRE, True
                    elif self.ier & IER_RDA and self._input:
                        self.iir, fire = IIR_RDA, True
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value & 0x1F
            elif offset == SCR:
                self.scr = value
            # FCR (offset 2 write), LSR and MSR writes: nothing to do for an instant transmitter.
        if out is not None:
            self._output(out)
        if fire:
            self._trigger()


def file_output(path: str) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """An output that appends to ``path``; returns (write, close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    return fd_output(fd), lambda: os.close(fd)


def fd_output(fd: int) -> Callable[[bytes], None]:
    """An output that writes to a file descriptor (a pipe, a tty, stdout); write errors are dropped."""

    def write(data: bytes) -> None:
        try:
            os.write(fd, data)
        except OSError:
            pass

    return write
