"""Guests that drive virtio-mmio registers through real KVM MMIO exits, ioeventfds and irqfds."""
from __future__ import annotations

import os
import select
import struct

from katapy.vmm.config import IrqChip
from katapy.vmm.state import ExitReason
from katapy.vmm.virtio import mmio
from tests.vmm.conftest import SerialCapture
from tests.vmm.guestasm import assemble, protected_mode_guest
from tests.vmm.recording_device import RecordingDevice

BASE = 0xD0000000

# A driver's initialisation (virtio 1.2, 3.1.1) in 32-bit guest code; %ebx = device base.
DRIVER_INIT = r"""
    mov $0xd0000000, %ebx
    mov 0x00(%ebx), %eax      /* MagicValue */
    call emit_eax
    mov 0x04(%ebx), %eax      /* Version */
    call emit_eax
    mov 0x08(%ebx), %eax      /* DeviceID */
    call emit_eax
    movl $0, 0x70(%ebx)       /* reset */
    movl $1, 0x70(%ebx)       /* ACKNOWLEDGE */
    movl $3, 0x70(%ebx)       /* DRIVER */
    movl $1, 0x14(%ebx)       /* DeviceFeaturesSel = 1 */
    mov 0x10(%ebx), %eax      /* DeviceFeatures[63:32] */
    call emit_eax
    movl $1, 0x24(%ebx)       /* DriverFeaturesSel = 1 */
    movl $1, 0x20(%ebx)       /* VIRTIO_F_VERSION_1 */
    movl $0xb, 0x70(%ebx)     /* FEATURES_OK */
    mov 0x70(%ebx), %eax      /* must read back FEATURES_OK */
    call emit_eax
    movl $0, 0x30(%ebx)       /* QueueSel 0 */
    mov 0x34(%ebx), %eax      /* QueueNumMax */
    call emit_eax
    movl $16, 0x38(%ebx)
    movl $QDESC, 0x80(%ebx)
    movl $0, 0x84(%ebx)
    movl $QAVAIL, 0x90(%ebx)
    movl $0, 0x94(%ebx)
    movl $QUSED, 0xa0(%ebx)
    movl $0, 0xa4(%ebx)
    movl $1, 0x44(%ebx)       /* QueueReady */
    movl $0xf, 0x70(%ebx)     /* DRIVER_OK */
    mov 0x70(%ebx), %eax
    call emit_eax
    mov 0x100(%ebx), %eax     /* config space */
    call emit_eax
"""


def words(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data[: len(data) // 4 * 4]))


def run_guest(vmm, body: str, defines: dict[str, int], device: RecordingDevice, timeout: float = 20):
    out = SerialCapture()
    src = "".join(f".set {k}, {v:#x}\n" for k, v in defines.items()) + body
    vmm.configure_machine(1, 64)
    vmm.add_device(device)
    vmm.add_serial_output(out)
    vmm.set_flat_boot(protected_mode_guest(src))
    vmm.start()
    return out


def test_driver_initialises_the_device_and_it_activates(vmm):
    dev = RecordingDevice()
    out = run_guest(vmm, DRIVER_INIT + "    jmp reset\n",
                    {"QDESC": 0x10000, "QAVAIL": 0x11000, "QUSED": 0x12000}, dev)
    ex = vmm.wait(20)
    assert ex.reason is ExitReason.RESET, ex
    magic, version, dev_id, feat_hi, status1, qmax, status2, cfg = words(bytes(out.data))
    assert (magic, version, dev_id) == (0x74726976, 2, RecordingDevice.device_type)
    assert feat_hi == 1  # VIRTIO_F_VERSION_1 is bit 32
    assert status1 == 0xB and status2 == 0xF
    assert qmax == 256
    assert cfg == struct.unpack("<I", b"KATA")[0]
    assert dev.activations == [[(16, 0x10000, 0x11000, 0x12000), (0, 0, 0, 0)]]
    assert "virtio_mmio.device=4K@0xd0000000:5" in vmm.built.devices.cmdline_fragments()


def test_queue_notify_goes_through_the_ioeventfd_and_interrupts_reach_interrupt_status(vmm):
    dev = RecordingDevice()
    out = run_guest(vmm, DRIVER_INIT + r"""
    movl $1, 0x50(%ebx)       /* QueueNotify queue 1: absorbed by KVM (ioeventfd datamatch 1) */
    movl $0, 0x50(%ebx)       /* QueueNotify queue 0 */
    mov $0x21, %eax
    call emit_eax
1:  mov 0x60(%ebx), %eax      /* poll InterruptStatus until the host raised it */
    test $1, %eax
    jz 1b
    call emit_eax
    movl $1, 0x64(%ebx)       /* InterruptACK */
    mov 0x60(%ebx), %eax
    call emit_eax
    jmp reset
""", {"QDESC": 0x10000, "QAVAIL": 0x11000, "QUSED": 0x12000}, dev)
    assert dev.activated.wait(10)
    assert out.wait_for(struct.pack("<I", 0x21))
    for q in (0, 1):
        poller = select.poll()  # poll, not select: a long test run may hold fds past FD_SETSIZE
        poller.register(dev.kick_fds[q], select.POLLIN)
        r = poller.poll(5000)
        assert r, f"kick fd of queue {q} never fired"
        assert os.eventfd_read(dev.kick_fds[q]) == 1
    transport = vmm.built.devices.slots[0].transport
    assert transport.notify_exits == 0  # no QueueNotify write reached userspace
    dev.interrupt.signal_used_queue(0)
    ex = vmm.wait(20)
    assert ex.reason is ExitReason.RESET, ex
    assert words(bytes(out.data))[-2:] == [1, 0]


def test_garbage_from_the_guest_cannot_break_the_vmm(vmm):
    dev = RecordingDevice()
    body = r"""
    mov $0xd0000000, %ebx
    movb $0xff, 0x03(%ebx)        /* unaligned byte write to MagicValue */
    movw $0xffff, 0x72(%ebx)      /* half-word write into Status */
    movl $0xffffffff, 0xf8(%ebx)  /* unknown register */
    movl $0xffffffff, 0xffc(%ebx) /* end of config window */
    mov 0x0ff(%ebx), %al          /* unaligned read */
    movl $0xf, 0x70(%ebx)         /* DRIVER_OK without the earlier steps */
    mov 0x70(%ebx), %eax
    call emit_eax
    mov $500, %ecx                /* reset storm */
1:  movl $0, 0x70(%ebx)
    movl $1, 0x70(%ebx)
    movl $3, 0x70(%ebx)
    movl $0x12345, 0x38(%ebx)     /* QueueNum before FEATURES_OK */
    loop 1b
""" + DRIVER_INIT.replace("movl $16, 0x38(%ebx)", "movl $17, 0x38(%ebx)\n    movl $512, 0x38(%ebx)\n    movl $16, 0x38(%ebx)") + r"""
    movl $0, 0x70(%ebx)
    jmp reset
"""
    # Queue 0 placed outside guest RAM (64 MiB): DRIVER_OK must end in DEVICE_NEEDS_RESET.
    out = run_guest(vmm, body, {"QDESC": 0xFFF00000, "QAVAIL": 0x11000, "QUSED": 0x12000}, dev)
    ex = vmm.wait(30)
    assert ex.reason is ExitReason.RESET, ex
    w = words(bytes(out.data))
    assert w[0] == 0  # DRIVER_OK out of order was refused
    assert w[1:4] == [0x74726976, 2, RecordingDevice.device_type]
    status_after_driver_ok = w[7]
    assert status_after_driver_ok & mmio.DEVICE_NEEDS_RESET
    assert not dev.activations
    assert dev.resets == 0  # never activated, so never reset


def test_irqfd_interrupt_is_handled_by_the_guest(vmm):
    """virtio interrupt -> irqfd (GSI 5) -> in-kernel PIC -> real-mode handler in the guest."""
    out = SerialCapture()
    vmm.configure_machine(1, 16)
    dev = RecordingDevice()
    vmm.add_device(dev)
    vmm.add_serial_output(out)
    vmm.set_flat_boot(assemble(r"""
.code16
    cli
    mov $0x11, %al            /* PIC ICW1: edge, cascade, ICW4 */
    out %al, $0x20
    mov $0x20, %al            /* ICW2: vectors 0x20.. */
    out %al, $0x21
    mov $0x04, %al            /* ICW3: slave on IRQ2 */
    out %al, $0x21
    mov $0x01, %al            /* ICW4: 8086 mode */
    out %al, $0x21
    mov $0xdf, %al            /* unmask IRQ5 only */
    out %al, $0x21
    movw $handler, 0x94       /* IVT entry for vector 0x25 */
    movw $0, 0x96
    mov $0x3f8, %dx
    mov $'R', %al
    out %al, %dx
    sti
1:  hlt
    cmpb $1, flag
    jne 1b
    mov $'D', %al
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
handler:
    push %ax
    push %dx
    movb $1, flag
    mov $0x3f8, %dx
    mov $'I', %al
    out %al, %dx
    mov $0x20, %al            /* EOI */
    out %al, $0x20
    pop %dx
    pop %ax
    iret
flag: .byte 0
"""))
    vmm.start()
    assert out.wait_for(b"R")
    transport = vmm.built.devices.slots[0].transport
    transport.raise_interrupt(mmio.INT_USED_BUFFER)
    ex = vmm.wait(10)
    assert ex is not None and ex.reason is ExitReason.RESET, (ex, bytes(out.data))
    assert bytes(out.data) == b"RID"


def test_irqfd_interrupt_through_the_split_irqchip_ioapic(vmm):
    """virtio interrupt -> irqfd (GSI 5) -> the MSI route katapy's IOAPIC made from the entry the guest
    programmed -> KVM's LAPIC -> protected-mode handler (IrqChip.SPLIT: KVM_CAP_SPLIT_IRQCHIP)."""
    out = SerialCapture()
    vmm.configure_machine(1, 16, IrqChip.SPLIT)
    dev = RecordingDevice()
    vmm.add_device(dev)
    vmm.add_serial_output(out)
    vmm.set_flat_boot(protected_mode_guest(r"""
    lidt idt_desc
    movl $0x1ff, 0xfee000f0       /* LAPIC spurious-vector register: software enable */
    movl $0x01, 0xfec00000        /* IOREGSEL = IOAPICVER */
    mov 0xfec00010, %eax
    call emit_eax
    movl $0x1a, 0xfec00000        /* redirection entry 5, low dword */
    movl $0x25, 0xfec00010        /* vector 0x25, fixed, physical, edge, unmasked */
    movl $0x1b, 0xfec00000        /* high dword */
    movl $0, 0xfec00010           /* destination: APIC id 0 */
    mov $0x3f8, %dx
    mov $'R', %al
    out %al, %dx
    sti
1:  hlt
    jmp 1b
handler:                          /* does not return: KVM's emulator (kvm-pvm) has no protected-mode iret */
    mov $0x3f8, %dx
    mov $'I', %al
    out %al, %dx
    movl $0, 0xfee000b0           /* LAPIC EOI */
    mov $'D', %al
    out %al, %dx
    jmp reset
.align 8
idt:
    .fill 0x25, 8, 0
    .word handler, 0x08           /* vector 0x25: 32-bit interrupt gate */
    .byte 0, 0x8e
    .word 0
idt_desc:
    .word 0x26 * 8 - 1
    .long idt
"""))
    vmm.start()
    assert out.wait_for(b"R")
    assert struct.unpack("<I", bytes(out.data)[:4])[0] == 0x00170011  # 24 entries, version 0x11
    transport = vmm.built.devices.slots[0].transport
    transport.raise_interrupt(mmio.INT_USED_BUFFER)
    ex = vmm.wait(10)
    assert ex is not None and ex.reason is ExitReason.RESET, (ex, bytes(out.data))
    assert bytes(out.data)[4:] == b"RID"
