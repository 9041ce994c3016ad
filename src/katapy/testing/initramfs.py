"""Small busybox initramfs images for tests that boot a kernel with their own /init.

The product's guest image is built by :mod:`katapy.osbuilder.image`; this is
for device and VMM tests that need a guest running a test script.
"""
from __future__ import annotations

import os
from pathlib import Path

from katapy.osbuilder.cpio import CpioWriter, write_gz

BUSYBOX = Path("/bin/busybox")


def busybox_initramfs(out: Path, init_script: str, extra_files: dict[str, Path | bytes] | None = None) -> Path:
    """Write ``out`` (gzip newc): busybox-static at /bin/busybox with /bin/sh, ``init_script`` as /init,
    and ``extra_files`` (guest path -> host file or bytes; host files keep their mode)."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing: install busybox-static (make deps)")

    def build(w: CpioWriter) -> None:
        for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "mnt", "etc", "root"):
            w.directory(d)
        w.char_device("dev/console", 5, 1)
        w.char_device("dev/null", 1, 3, 0o666)
        w.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
        w.symlink("bin/sh", "busybox")
        w.file("init", init_script.encode(), 0o755)
        for guest_path, src in sorted((extra_files or {}).items()):
            parts = guest_path.strip("/").split("/")
            for i in range(1, len(parts)):
                w.directory("/".join(parts[:i]))
            if isinstance(src, bytes):
                w.file(guest_path, src, 0o755)
            else:
                w.file(guest_path, Path(src).read_bytes(), os.stat(src).st_mode & 0o7777)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_gz(out, build)
    return out
