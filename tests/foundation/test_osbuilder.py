"""The kernel and image builders: configuration checks, cache integrity, clear errors (issue 2)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from katapy import paths
from katapy.osbuilder import image, kernel


def test_broken_fragment_is_named_with_its_line(tmp_path):
    frag = tmp_path / "katapy.conf"
    frag.write_text("CONFIG_SMP=y\nthis is not a config line\n")
    with pytest.raises(kernel.KernelBuildError, match=rf"{frag}:2: not a kernel config line"):
        kernel.parse_fragment(frag)


def test_missing_fragment_is_named(tmp_path):
    with pytest.raises(kernel.KernelBuildError, match=str(tmp_path / "katapy.conf")):
        kernel.build("guest", fragment_dir=tmp_path)


def test_options_the_resolved_config_lacks_are_listed(tmp_path):
    cfg = tmp_path / ".config"
    cfg.write_text("CONFIG_SMP=y\n# CONFIG_EROFS_FS is not set\nCONFIG_NR_CPUS=8\n")
    missing = kernel.missing_options({"CONFIG_SMP": "y", "CONFIG_EROFS_FS": "y", "CONFIG_KVM": "y"}, cfg)
    assert missing == ["CONFIG_EROFS_FS=y (resolved: n)", "CONFIG_KVM=y (resolved: n)"]


def built_kernel(flavor: str) -> kernel.KernelBuild:
    entry = kernel.KernelBuild(flavor, paths.cache_dir() / "kernel" / f"{flavor}-{kernel.cache_key(flavor)}")
    if kernel.verify(entry) is not None:
        pytest.skip(f"the {flavor} kernel is not built (make kernel): {kernel.verify(entry)}")
    return entry


def test_built_guest_kernel_has_every_fragment_option():
    entry = built_kernel("guest")
    wanted = kernel.parse_fragment(kernel.FRAGMENT_DIR / "katapy.conf")
    assert kernel.missing_options(wanted, entry.config) == []
    assert entry.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert entry.bzimage.read_bytes()[0x202:0x206] == b"HdrS"  # Linux boot protocol magic


def test_corrupt_cache_entry_is_detected(tmp_path):
    entry = built_kernel("guest")
    copy = tmp_path / entry.directory.name
    copy.mkdir()
    for n in ("vmlinux", "bzImage", "config", "manifest.json"):
        shutil.copyfile(entry.directory / n, copy / n)
    fake = kernel.KernelBuild("guest", copy)
    assert kernel.verify(fake) is None
    with (copy / "bzImage").open("r+b") as f:
        f.seek(1000)
        f.write(b"\xde\xad\xbe\xef")
    assert "does not match its manifest checksum" in kernel.verify(fake)
    (copy / "manifest.json").write_text("{not json")
    assert "unreadable" in kernel.verify(fake)


def test_missing_package_list_is_named(tmp_path):
    with pytest.raises(image.ImageBuildError, match=str(tmp_path / "packages.txt")):
        image.build(config_dir=tmp_path)


def test_guest_image_contents():
    img = paths.guest_initramfs()
    if not img.exists():
        pytest.skip(f"guest image {img} is not built (make image)")
    manifest = json.loads((img.resolve().parent / "manifest.json").read_text())
    for pkg in ("busybox-static", "python3.11-minimal", "crun"):
        assert manifest["packages"][pkg], f"{pkg} not pinned"
    listing = subprocess.run(["cpio", "-t"], input=img.read_bytes(), capture_output=True).stdout.decode()
    names = set(listing.split())
    for needed in ("init", "usr/bin/python3.11", "usr/bin/crun", "usr/bin/busybox",
                   "usr/lib/katapy/katapy/agent/__main__.pyc", "usr/lib/katapy/google/protobuf/message.pyc",
                   "usr/lib/katapy/google/_upb/_message.abi3.so", "usr/lib/python3.11/os.pyc"):
        assert needed in names, f"{needed} not in the image"
    # sourceless: compiled modules only, no .py to stat or read at import
    assert not [n for n in names if n.startswith("usr/lib/katapy/") and n.endswith(".py")]


def test_a_kernel_build_reports_its_progress_against_the_last_recorded_build(tmp_path, monkeypatch, capsys):
    """The estimate comes from the last build of the flavor recorded in a cache manifest; while kbuild
    writes its log, a line says the steps done of those expected and the time left."""
    import threading
    import time

    monkeypatch.setenv("KATAPY_CACHE", str(tmp_path))
    assert kernel.expected_build("guest") == (kernel.DEFAULT_STEPS, None)  # nothing recorded yet
    old = tmp_path / "kernel" / "guest-0123"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"key": "0123", "flavor": "guest", "sha256": {},
                                                   "steps": 200, "build_s": 300}))
    assert kernel.expected_build("guest") == (200, 300.0)
    assert kernel.expected_build("harness") == (kernel.DEFAULT_STEPS, None)
    log = tmp_path / "build.log"
    log.write_bytes(b"  HOSTCC  scripts/basic/fixdep\n" + b"".join(b"  CC      kernel/f%d.o\n" % i for i in range(99))
                    + b"make[1]: Entering directory\n")
    monkeypatch.setattr(kernel, "PROGRESS_EVERY_S", 0.05)
    done = threading.Event()
    t = threading.Thread(target=kernel._report_progress, args=("guest", log, done, time.monotonic() - 60, (200, 300.0)))
    t.start()
    time.sleep(0.3)
    done.set()
    t.join(5)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "build steps" in ln]
    assert lines and "guest: 100/~200 build steps (50%), 1.0 min, ~1 min left" in lines[-1], lines
