/* A tiny x86 guest for QEMU's PVH boot (Xen PVH ABI: 32-bit protected mode, paging off,
 * entry from the XEN_ELFNOTE_PHYS32_ENTRY note, type 18).  It prints a line on the 8250
 * at 0x3f8 and halts; built with RESET it then triple-faults (empty IDT + int3), which
 * QEMU's -no-reboot turns into an exit: the guest-reset path of the qemu backend. */
.section .note.pvh,"a",@note
.balign 4
.long 4            /* namesz */
.long 4            /* descsz */
.long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.balign 4
.long _start

.text
.code32
.globl _start
_start:
  mov $msg, %esi
1: lodsb
  test %al, %al
  jz 2f
  mov $0x3f8, %dx
  out %al, %dx
  jmp 1b
2:
.ifdef RESET
  lidt nullidt
  int $3
.endif
3: hlt
  jmp 3b
nullidt: .word 0
  .long 0
msg: .asciz "katapy-tiny: ready\n"
