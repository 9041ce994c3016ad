"""Builds the tiny test guests from GNU assembler source (binutils `as` + `ld` to a flat binary)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

LOAD_ADDR = 0x1000

#: Real mode -> 32-bit protected mode with flat segments; keeps the stack the VMM gave each vCPU.
PROTECTED_MODE_PROLOGUE = r"""
.code16
    cli
    lgdtl gdt_desc
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $pm32
.code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    jmp body
.align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
emit_eax:            /* eax -> four bytes, little-endian, on COM1 */
    push %edx
    push %ecx
    mov $0x3f8, %dx
    mov $4, %ecx
1:  out %al, %dx
    shr $8, %eax
    loop 1b
    pop %ecx
    pop %edx
    ret
reset:
    mov $0xfe, %al
    out %al, $0x64
    hlt
body:
"""


def assemble(source: str, org: int = LOAD_ADDR) -> bytes:
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("binutils (as, ld) are not installed; the test guests are built with them")
    with tempfile.TemporaryDirectory() as d:
        src, obj, out = Path(d, "g.S"), Path(d, "g.o"), Path(d, "g.bin")
        src.write_text(source + "\n")
        subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True, capture_output=True)
        subprocess.run(
            ["ld", "-m", "elf_i386", f"-Ttext={org:#x}", "--oformat", "binary", "-o", str(out), str(obj)],
            check=True,
            capture_output=True,
        )
        return out.read_bytes()


def protected_mode_guest(body: str) -> bytes:
    return assemble(PROTECTED_MODE_PROLOGUE + body)
