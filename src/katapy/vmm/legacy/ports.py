"""The small port-I/O answers a booting x86 kernel expects (PC/AT conventions):

* 0x80 POST/debug port: writes are swallowed (Linux uses it as an I/O delay);
  the last value is kept for tests and debugging.
* 0x70/0x71 CMOS RTC (Motorola MC146818A data sheet): an index register and
  the time registers in BCD, 24-hour mode, from the host's UTC clock;
  everything else reads 0.
* 0xcf8-0xcff PCI configuration mechanism #1 (PCI Local Bus spec 3.0,
  3.2.2.3.2): no PCI bus, so every read returns all-ones ("no device").
* 0x20/0x21 and 0xa0/0xa1, with a split irqchip: the 8259A pair as a guest
  can probe, initialise and mask it (Intel 8259A data sheet, "Programming the
  8259A": ICW1-ICW4, OCW1 mask read back), which never raises an interrupt:
  katapy's devices signal through the I/O APIC (legacy/ioapic.py).  Linux
  then keeps ISA IRQs 0-15 identity-mapped to I/O APIC pins, as on a PC.
"""
from __future__ import annotations

import time

DEBUG_PORT = 0x80
CMOS_PORT = 0x70
PCI_CONFIG_PORT = 0xCF8
PCI_CONFIG_SPAN = 8
PIC_MASTER_PORT, PIC_SLAVE_PORT, PIC_SPAN = 0x20, 0xA0, 2


class DebugPort:
    def __init__(self) -> None:
        self.last = 0

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.last = data[0]


def _bcd(n: int) -> int:
    return ((n // 10) << 4) | (n % 10)


class Cmos:
    REG_STATUS_A, REG_STATUS_B, REG_STATUS_C, REG_STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D

    def __init__(self) -> None:
        self.index = 0

    def _register(self, index: int) -> int:
        t = time.gmtime()
        values = {
            0x00: _bcd(t.tm_sec),
            0x02: _bcd(t.tm_min),
            0x04: _bcd(t.tm_hour),
            0x06: _bcd(t.tm_wday + 1 if t.tm_wday < 6 else 1),
            0x07: _bcd(t.tm_mday),
            0x08: _bcd(t.tm_mon),
            0x09: _bcd(t.tm_year % 100),
            0x32: _bcd(t.tm_year // 100),
            self.REG_STATUS_A: 0x26,  # 32.768 kHz time base, no update in progress
            self.REG_STATUS_B: 0x02,  # 24-hour mode, BCD
            self.REG_STATUS_D: 0x80,  # valid RAM and time
        }
        return values.get(index, 0)

    def read(self, offset: int, length: int) -> bytes:
        value = self.index if offset == 0 else self._register(self.index)
        return bytes([value]) + bytes(length - 1)

    def write(self, offset: int, data: bytes) -> None:
        if data and offset == 0:
            self.index = data[0] & 0x7F  # bit 7 is the NMI mask


class NoPciBus:
    """0xcf8-0xcff: reads all-ones, writes ignored."""

    def read(self, offset: int, length: int) -> bytes:
        return b"\xff" * length

    def write(self, offset: int, data: bytes) -> None:
        pass


class SilentPic:
    """One 8259A that takes its initialisation and masks but has no inputs: reads give the mask (port 1)
    or 0 (IRR/ISR, port 0); an ICW1 starts the ICW2..ICW4 sequence on port 1."""

    ICW1_INIT, ICW1_SINGLE, ICW1_NEED_ICW4 = 0x10, 0x02, 0x01

    def __init__(self) -> None:
        self.mask = 0xFF
        self._icws_left: list[str] = []

    def read(self, offset: int, length: int) -> bytes:
        value = self.mask if offset == 1 else 0
        return bytes([value]) + bytes(length - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        if offset == 0:
            if value & self.ICW1_INIT:
                self.mask = 0
                self._icws_left = ["icw2"] + ([] if value & self.ICW1_SINGLE else ["icw3"])
                self._icws_left += ["icw4"] if value & self.ICW1_NEED_ICW4 else []
            return  # OCW2/OCW3 (EOI, register select): nothing is ever in service
        if self._icws_left:
            self._icws_left.pop(0)
        else:
            self.mask = value  # OCW1
