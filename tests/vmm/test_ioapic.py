"""katapy's I/O APIC (split irqchip) register semantics and routes, and the silent PIC, without a VM.

The delivery path through KVM is tested with a guest in test_virtio_mmio_guest.py
(test_irqfd_interrupt_through_the_split_irqchip_ioapic) and by booting Linux with IrqChip.SPLIT.
"""
from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from katapy.vmm.kvm.vm import MsiRoute
from katapy.vmm.legacy.ioapic import IOREGSEL, IOWIN, Ioapic
from katapy.vmm.legacy.ports import SilentPic


class Guest:
    def __init__(self) -> None:
        self.tables: list[list[MsiRoute]] = []
        self.ioapic = Ioapic(self.tables.append)

    def write(self, index: int, value: int) -> None:
        self.ioapic.write(IOREGSEL, struct.pack("<I", index))
        self.ioapic.write(IOWIN, struct.pack("<I", value))

    def read(self, index: int) -> int:
        self.ioapic.write(IOREGSEL, struct.pack("<I", index))
        return struct.unpack("<I", self.ioapic.read(IOWIN, 4))[0]


def test_version_and_reset_state_all_pins_masked():
    g = Guest()
    assert g.read(0x01) == 0x00170011
    assert all(g.read(0x10 + 2 * pin) & (1 << 16) for pin in range(24))
    assert g.tables == []


def test_an_unmasked_entry_becomes_an_msi_route_and_masking_removes_it():
    g = Guest()
    g.write(0x11 + 2 * 4, 0x03 << 24)       # pin 4: destination APIC id 3
    g.write(0x10 + 2 * 4, 0x0000_0931)      # vector 0x31, lowest priority, logical, edge, unmasked
    assert g.tables[-1] == [MsiRoute(4, 0xFEE0_0000 | 3 << 12 | 1 << 2, 0x31 | 1 << 8)]
    g.write(0x10 + 2 * 4, 0x0001_0931)      # masked
    assert g.tables[-1] == []


def test_level_triggered_entries_are_routed_as_edges_and_read_only_bits_keep_their_value():
    g = Guest()
    g.write(0x10, 0x0000_F040)              # pin 0: vector 0x40, trigger level, Remote IRR and status set
    assert g.tables[-1] == [MsiRoute(0, 0xFEE0_0000, 0x40)]
    assert g.read(0x10) == 0x0000_A040      # bits 12 (delivery status) and 14 (Remote IRR) stay 0


def test_garbage_from_the_guest_is_ignored():
    g = Guest()
    for index in (0x03, 0x0F, 0x40, 0xFF):
        g.write(index, 0xFFFF_FFFF)
        assert g.read(index) == 0
    g.ioapic.write(IOWIN, b"\x00\x01")      # not a 32-bit store
    g.ioapic.write(0x20, struct.pack("<I", 0))  # no register there
    assert g.ioapic.read(0x20, 4) == bytes(4) and g.ioapic.read(IOWIN, 2) == bytes(2)
    assert g.tables == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([IOREGSEL, IOWIN, 0x04, 0x40, 0xFFC]),
                          st.binary(min_size=0, max_size=8)), max_size=60))
def test_any_access_sequence_gives_well_formed_routes(accesses):
    g = Guest()
    for offset, data in accesses:
        g.ioapic.write(offset, data)
        assert len(g.ioapic.read(offset, len(data))) == len(data)
    for table in g.tables:
        assert len({r.gsi for r in table}) == len(table)
        for r in table:
            assert 0 <= r.gsi < 24
            assert r.address & 0xFFF0_0FF3 == 0xFEE0_0000  # only destination and destination mode vary
            assert r.data < 1 << 11                         # vector and delivery mode, edge


def test_silent_pic_probes_initialises_and_masks_like_an_8259a():
    pic = SilentPic()
    pic.write(1, b"\xfb")                  # Linux's probe: write a mask, read it back
    assert pic.read(1, 1) == b"\xfb"
    pic.write(0, b"\x11")                  # ICW1: cascade, ICW4 needed
    for icw in (b"\x20", b"\x04", b"\x01"):  # ICW2-ICW4 are not masks
        pic.write(1, icw)
    assert pic.read(1, 1) == b"\x00"
    pic.write(1, b"\xff")                  # OCW1
    assert pic.read(1, 1) == b"\xff" and pic.read(0, 1) == b"\x00"
