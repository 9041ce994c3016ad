"""8250 UART, i8042 and the small legacy ports, as bus devices."""
from __future__ import annotations

from katapy.vmm.bus import Bus, BusError
from katapy.vmm.legacy import i8042, ports, serial

import pytest


def test_uart_output_thre_interrupt_and_loopback():
    out, irqs = bytearray(), []
    u = serial.Serial(out.extend, lambda: irqs.append(1))
    u.write(serial.DATA, b"x")
    assert out == b"x" and not irqs  # IER off: no interrupt
    assert u.read(serial.LSR, 1)[0] & (serial.LSR_THRE | serial.LSR_TEMT) == 0x60
    u.write(serial.IER, bytes([serial.IER_THRE]))
    assert irqs  # enabling THRE with an empty THR interrupts at once
    assert u.read(serial.IIR, 1)[0] & 0x0F == serial.IIR_THRE
    assert u.read(serial.IIR, 1)[0] & 0x0F == serial.IIR_NONE  # reading IIR cleared it
    u.write(serial.MCR, bytes([serial.MCR_LOOP | 0x0A]))
    assert u.read(serial.MSR, 1)[0] & 0xF0 == 0x90  # what Linux's 8250 probe checks
    u.write(serial.DATA, b"L")
    assert u.read(serial.DATA, 1) == b"L" and out == b"x"
    u.write(serial.LCR, bytes([serial.LCR_DLAB]))
    u.write(serial.DATA, b"\x01")
    assert u.read(serial.DATA, 1) == b"\x01"


def test_uart_input_with_rda_interrupt():
    irqs = []
    u = serial.Serial(None, lambda: irqs.append(1))
    u.write(serial.IER, bytes([serial.IER_RDA]))
    assert u.enqueue_input(b"ab") == 2 and irqs
    assert u.read(serial.LSR, 1)[0] & serial.LSR_DR
    assert u.read(serial.DATA, 1) + u.read(serial.DATA, 1) == b"ab"
    assert not u.read(serial.LSR, 1)[0] & serial.LSR_DR
    assert u.enqueue_input(b"z" * (serial.INPUT_BUFFER_MAX + 10)) == serial.INPUT_BUFFER_MAX


def test_i8042_self_test_and_reset():
    resets = []
    k = i8042.I8042(lambda: resets.append(1))
    k.write(4, b"\xaa")
    assert k.read(4, 1)[0] & i8042.STATUS_OBF and k.read(0, 1) == b"\x55"
    k.write(4, bytes([i8042.CMD_WRITE_CTR]))
    k.write(0, b"\x47")
    k.write(4, bytes([i8042.CMD_READ_CTR]))
    assert k.read(0, 1) == b"\x47"
    assert not resets
    k.write(4, b"\xfe")
    assert resets == [1]
    k.write(4, bytes([i8042.CMD_WRITE_OUTP]))
    k.write(0, b"\x00")  # reset line asserted
    assert resets == [1, 1]


def test_i8042_port_enable_bits_and_keylock_status():
    """Linux's i8042 probe (drivers/input/serio/i8042.c) reads the configuration byte back after 0xA7/0xA8
    and 0xAD/0xAE and warns when the status says the keyboard is locked."""
    k = i8042.I8042(lambda: None)
    assert k.read(4, 1)[0] & i8042.STATUS_KEYLOCK

    def ctr() -> int:
        k.write(4, bytes([i8042.CMD_READ_CTR]))
        return k.read(0, 1)[0]

    k.write(4, bytes([i8042.CMD_DISABLE_AUX]))
    assert ctr() & i8042.CTR_AUX_DISABLED
    k.write(4, bytes([i8042.CMD_ENABLE_AUX]))
    assert not ctr() & i8042.CTR_AUX_DISABLED
    k.write(4, bytes([i8042.CMD_DISABLE_KBD]))
    assert ctr() & i8042.CTR_KBD_DISABLED
    k.write(4, bytes([i8042.CMD_ENABLE_KBD]))
    assert not ctr() & i8042.CTR_KBD_DISABLED


def test_cmos_pci_and_unclaimed_ports():
    bus = Bus("pio")
    bus.insert(ports.Cmos(), ports.CMOS_PORT, 2)
    bus.insert(ports.NoPciBus(), ports.PCI_CONFIG_PORT, 8)
    bus.write(0x70, b"\x0b")
    assert bus.read(0x71, 1) == b"\x02"  # 24-hour BCD
    bus.write(0x70, b"\x0a")
    assert not bus.read(0x71, 1)[0] & 0x80  # no update in progress
    assert bus.read(0xCFC, 4) == b"\xff\xff\xff\xff"
    assert bus.read(0x2F8, 1) == b"\xff" and bus.write(0x2F8, b"\0") is False
    with pytest.raises(BusError):
        bus.insert(ports.DebugPort(), 0x71, 1)  # overlaps CMOS
