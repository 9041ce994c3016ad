"""Fixtures for the hypervisor tests: a tiny PVH guest and the real guest artifacts."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
QEMU = shutil.which("qemu-system-x86_64")


def _build_tiny(out: Path, reset: bool) -> Path:
    obj, elf = out / "tiny.o", out / "tiny.elf"
    defs = ["--defsym", "RESET=1"] if reset else []
    # a 64-bit ELF holding 32-bit code: QEMU and katapy's VMM both take it; -N keeps the ELF
    # headers out of the loaded segments (nothing below 1 MiB)
    subprocess.run(["as", "--64", *defs, "-o", str(obj), str(HERE / "tiny_guest.S")], check=True)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-N", "--no-warn-rwx-segments", "-Ttext", "0x100000",
         "--section-start=.note.pvh=0x100800", "-o", str(elf), str(obj)],
        check=True,
    )
    return elf


@pytest.fixture(scope="session")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"halt": elf, "reset": elf, "initrd": filler}: a guest QEMU boots in milliseconds under TCG."""
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("binutils (as, ld) not installed: cannot build the tiny PVH guest")
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed")
    d = tmp_path_factory.mktemp("tiny")
    (d / "halt").mkdir()
    (d / "reset").mkdir()
    initrd = d / "initrd.bin"
    initrd.write_bytes(bytes(512))  # never read by the tiny guest; loaders want a non-empty one
    return {"halt": _build_tiny(d / "halt", False), "reset": _build_tiny(d / "reset", True), "initrd": initrd}


@pytest.fixture
def short_tmp() -> Path:
    """A short temporary directory (unix socket paths must stay under 108 bytes)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="kh-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def open_fds() -> set[str]:
    """This process's open file descriptors, as 'fd -> target' strings."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


# the sandbox fixtures (katapy_sandbox: one VM shared by the session; katapy_fresh_sandbox: one per test)
from katapy.testing.sandbox import _katapy_shared_sandbox, katapy_fresh_sandbox, katapy_sandbox  # noqa: E402,F401
