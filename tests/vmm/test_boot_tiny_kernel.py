"""The kernel boot path (ELF loader, zero page / PVH start info, GDT, page tables, long mode) with a
tiny "kernel" built here: it prints what the boot protocol handed it, then resets the machine.
This runs on kvm-pvm, which executes such small programs in long mode."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from katapy.vmm.boot.loader import BootProtocol
from katapy.vmm.state import ExitReason
from tests.vmm.conftest import SerialCapture

TINY_KERNEL = r"""
.section .text
.code64
.globl _start
_start:                         /* Linux 64-bit boot protocol: %rsi = boot_params */
    mov $0x3f8, %dx
    mov %cs, %ax
    out %al, %dx                /* __BOOT_CS = 0x10 */
    mov %ds, %ax
    out %al, %dx                /* __BOOT_DS = 0x18 */
    movzbl 0x1e8(%rsi), %eax    /* e820_entries */
    out %al, %dx
    mov 0x210(%rsi), %al        /* type_of_loader */
    out %al, %dx
    mov 0x228(%rsi), %ebx       /* cmd_line_ptr */
1:  mov (%rbx), %al
    test %al, %al
    jz 2f
    out %al, %dx
    inc %rbx
    jmp 1b
2:  mov 0x218(%rsi), %ebx       /* ramdisk_image: print its first 4 bytes */
    mov $4, %ecx
3:  mov (%rbx), %al
    out %al, %dx
    inc %rbx
    loop 3b
    mov $0xfe, %al
    out %al, $0x64
    hlt

.code32
pvh_start:                      /* PVH: 32-bit, paging off, %ebx = hvm_start_info */
    mov $0x3f8, %dx
    mov 0(%ebx), %eax           /* magic */
    mov $4, %ecx
4:  out %al, %dx
    shr $8, %eax
    loop 4b
    mov 12(%ebx), %al           /* nr_modules */
    out %al, %dx
    mov 48(%ebx), %al           /* memmap_entries */
    out %al, %dx
    mov 24(%ebx), %esi          /* cmdline_paddr */
5:  mov (%esi), %al
    test %al, %al
    jz 6f
    out %al, %dx
    inc %esi
    jmp 5b
6:  mov 16(%ebx), %esi          /* modlist_paddr -> module 0 paddr */
    mov (%esi), %esi
    mov $4, %ecx
7:  mov (%esi), %al
    out %al, %dx
    inc %esi
    loop 7b
    mov $0xfe, %al
    out %al, $0x64
    hlt

.pushsection .note.Xen, "a", @note
    .long 4                     /* namesz */
    .long 4                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
.popsection
"""


@pytest.fixture(scope="module")
def tiny_kernel(tmp_path_factory):
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("binutils (as, ld) are not installed")
    d = tmp_path_factory.mktemp("tinykernel")
    (d / "k.S").write_text(TINY_KERNEL)
    subprocess.run(["as", "--64", "-o", str(d / "k.o"), str(d / "k.S")], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x1000000", "-e", "_start", "-o", str(d / "vmlinux"),
                    str(d / "k.o")], check=True, capture_output=True)
    (d / "initrd").write_bytes(b"INRD" + bytes(4092))
    return d


@pytest.mark.parametrize("vcpus", [1, 2])
def test_linux64_entry_sees_boot_params(vmm, tiny_kernel, vcpus):
    out = SerialCapture()
    vmm.configure_machine(vcpus, 64)
    vmm.set_boot_source(tiny_kernel / "vmlinux", tiny_kernel / "initrd", "console=ttyS0 tiny")
    vmm.add_serial_output(out)
    vmm.start()
    ex = vmm.wait(20)
    assert ex is not None and ex.reason is ExitReason.RESET, (ex, bytes(out.data))
    data = bytes(out.data)
    assert data[:4] == bytes([0x10, 0x18, 3, 0xFF])  # CS, DS, e820 entries, type_of_loader
    assert data[4:] == b"console=ttyS0 tinyINRD"


def test_pvh_entry_sees_start_info(vmm, tiny_kernel):
    out = SerialCapture()
    vmm.configure_machine(1, 64)
    vmm.set_boot_source(tiny_kernel / "vmlinux", tiny_kernel / "initrd", "pvh boot", BootProtocol.PVH)
    vmm.add_serial_output(out)
    vmm.start()
    ex = vmm.wait(20)
    assert ex is not None and ex.reason is ExitReason.RESET, (ex, bytes(out.data))
    data = bytes(out.data)
    assert data[:4] == (0x336EC578).to_bytes(4, "little")
    assert data[4:6] == bytes([1, 3])  # one module (the initrd), three memory map entries
    assert data[6:] == b"pvh bootINRD"


def test_cli_boots_a_kernel_from_toml(kvm_required, tiny_kernel, tmp_path):
    import os
    import sys

    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'kernel = "{tiny_kernel / "vmlinux"}"\ninitrd = "{tiny_kernel / "initrd"}"\n'
                   'cmdline = "from the cli"\nvcpus = 1\nmem_mib = 32\nirqchip = "split"\n')
    env = dict(os.environ, PYTHONPATH=str(__import__("katapy").__path__[0].rsplit("/katapy", 1)[0]))
    r = subprocess.run([sys.executable, "-m", "katapy.cli", "vmm", "--config", str(cfg)],
                       capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr.decode()
    assert b"from the cliINRD" in r.stdout
    assert b"guest ended: reset" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"kernel": "/nonexistent", "vcpus": 1}')
    r = subprocess.run([sys.executable, "-m", "katapy.cli", "vmm", "--config", str(bad)],
                       capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and b"no such file" in r.stderr
    chip = tmp_path / "chip.json"
    chip.write_text(f'{{"kernel": "{tiny_kernel / "vmlinux"}", "irqchip": "userspace"}}')
    r = subprocess.run([sys.executable, "-m", "katapy.cli", "vmm", "--config", str(chip)],
                       capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and b"irqchip 'userspace': expected one of ['kernel', 'split']" in r.stderr


def test_cli_takes_the_hotplug_maxima(kvm_required, tiny_kernel, tmp_path):
    """``max_vcpus`` / ``max_mem_mib`` in a ``katapy vmm`` description: a VM declared to grow boots; maxima
    below the boot size are refused as configuration errors (exit 2, the key named)."""
    import os
    import sys

    env = dict(os.environ, PYTHONPATH=str(__import__("katapy").__path__[0].rsplit("/katapy", 1)[0]))

    def run(extra: str) -> subprocess.CompletedProcess[bytes]:
        cfg = tmp_path / "vm.toml"
        cfg.write_text(f'kernel = "{tiny_kernel / "vmlinux"}"\ninitrd = "{tiny_kernel / "initrd"}"\n'
                       f'cmdline = "grows"\nvcpus = 1\nmem_mib = 32\n{extra}')
        return subprocess.run([sys.executable, "-m", "katapy.cli", "vmm", "--config", str(cfg)],
                              capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)

    r = run("max_vcpus = 4\nmax_mem_mib = 512\n")
    assert r.returncode == 0 and b"growsINRD" in r.stdout, r.stderr.decode()
    r = run("max_vcpus = 0\n")
    assert r.returncode == 2 and b"max_vcpus" in r.stderr, r.stderr.decode()
