/* Benchmark guest for benchmarks/vmm_boot.py: a PVH ELF (Xen PVH ABI: 32-bit protected mode, paging
 * off, entry from the XEN_ELFNOTE_PHYS32_ENTRY note).  It writes 'S' to the 8250 data port (its first
 * exit), reads the dword at MMIO_ADDR EXITS times (one MMIO exit each: nothing backs that address
 * with RAM), writes 'D', and halts.  The host times S->D and divides by EXITS. */
.section .note.pvh,"a",@note
.balign 4
.long 4
.long 4
.long 18
.asciz "Xen"
.balign 4
.long _start

.text
.code32
.globl _start
_start:
  mov $0x3f8, %dx
  mov $'S', %al
  out %al, %dx
  mov $EXITS, %ecx
1: mov MMIO_ADDR, %eax
  dec %ecx
  jnz 1b
  mov $0x3f8, %dx
  mov $'D', %al
  out %al, %dx
2: hlt
  jmp 2b
