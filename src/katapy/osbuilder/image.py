"""Build katapy's guest image: an initramfs from pinned Debian packages plus the agent.

Packages (configs/guest-image/packages.txt) are fetched with ``apt-get
download`` at the version apt resolves, which is then pinned in the build's
manifest and in the cache key; they are unpacked with ``dpkg-deb -x`` (never
installed).  The tree is pruned (docs, locales, unused Python modules and
extensions), katapy's agent and its Python dependencies are added as compiled
``.pyc`` (unchecked-hash, so no stat() per import), every ELF file's
DT_NEEDED libraries are resolved inside the image, and the result is written
as an uncompressed newc cpio (under QEMU TCG the kernel's gunzip of a
gzip'd image cost ~2.5 s more boot than copying the plain archive).

Guest layout: /init (busybox sh) sets up the mounts and execs the agent as
PID 1; Python code for the agent lives in /usr/lib/katapy (PYTHONPATH).
"""
from __future__ import annotations

import compileall
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from katapy import paths
from katapy.osbuilder.cpio import CpioWriter, write_archive

IMAGE_CONFIG_DIR = paths.REPO_ROOT / "configs" / "guest-image"
BUILDER_VERSION = "2"
#: katapy sub-packages the guest needs (the agent's import closure)
AGENT_PACKAGES = ("agent", "ttrpc", "pb", "upcall", "protocol")
#: third-party Python packages shipped in the guest, taken from this environment
PYTHON_DEPS = ("google/protobuf", "google/_upb", "pyroute2")

# Parts of Debian's stdlib the agent never imports: dropped to keep the image small.
STDLIB_PRUNE = (
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils",
    "config-3.11-x86_64-linux-gnu", "dbm", "curses", "venv", "xmlrpc", "wsgiref", "html",
"lib-dynload/_dbm.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_gdbm.cpython-311-x86_64-linux-gnu.so", "lib-dynload/readline.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_curses.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_curses_panel.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so", "lib-dynload/_testbuffer.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_testinternalcapi.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_testmultiphase.cpython-311-x86_64-linux-gnu.so", "lib-dynload/_xxtestfuzz.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_testclinic.cpython-311-x86_64-linux-gnu.so", "lib-dynload/_ctypes_test.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_testimportmultiple.cpython-311-x86_64-linux-gnu.so", "lib-dynload/audioop.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/ossaudiodev.cpython-311-x86_64-linux-gnu.so", "lib-dynload/_codecs_jp.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_codecs_kr.cpython-311-x86_64-linux-gnu.so", "lib-dynload/_codecs_cn.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_codecs_tw.cpython-311-x86_64-linux-gnu.so", "lib-dynload/_codecs_hk.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/_codecs_iso2022.cpython-311-x86_64-linux-gnu.so", "lib-dynload/xxlimited.cpython-311-x86_64-linux-gnu.so",
    "lib-dynload/xxlimited_35.cpython-311-x86_64-linux-gnu.so", "lib-dynload/_xxsubinterpreters.cpython-311-x86_64-linux-gnu.so",
    "pydoc.py", "doctest.py", "mailbox.py", "imaplib.py", "nntplib.py", "smtplib.py", "ftplib.py", "tarfile.py",
    "lib-dynload/nis.cpython-311-x86_64-linux-gnu.so", "lib-dynload/_tkinter.cpython-311-x86_64-linux-gnu.so",
)
TREE_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian", "usr/share/info",
              "usr/lib/x86_64-linux-gnu/gconv", "usr/share/bug", "usr/share/bash-completion", "etc/init.d")

INIT_SCRIPT = """#!/bin/busybox sh
# katapy guest init: the minimum before the agent takes over as PID 1.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
/bin/busybox mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
/bin/busybox mount -t tmpfs -o mode=1777 tmpfs /dev/shm
/bin/busybox mount -t tmpfs -o mode=0755 tmpfs /run
/bin/busybox mount -t tmpfs -o mode=1777 tmpfs /tmp
/bin/busybox mount -t cgroup2 cgroup2 /sys/fs/cgroup
/bin/busybox ip link set lo up
echo "katapy-init: starting agent"
export PYTHONPATH=/usr/lib/katapy PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3.11 -S -m katapy.agent
"""


class ImageBuildError(Exception):
    pass


@dataclass(frozen=True)
class GuestImage:
    path: Path
    manifest: dict


def _progress(msg: str) -> None:
    print(f"osbuilder: image: {msg}", file=sys.stderr, flush=True)


def package_names(config_dir: Path = IMAGE_CONFIG_DIR) -> list[str]:
    f = config_dir / "packages.txt"
    if not f.is_file():
        raise ImageBuildError(f"guest package list {f} does not exist")
    names = [l.split("#")[0].strip() for l in f.read_text().splitlines()]
    return [n for n in names if n]


def resolve_versions(names: list[str]) -> dict[str, str]:
    """Candidate version of each package per apt's current view (the pin recorded for this build)."""
    out = subprocess.run(["apt-cache", "policy", *names], capture_output=True, text=True)
    versions: dict[str, str] = {}
    current = None
    for line in out.stdout.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            versions[current] = line.split(":", 1)[1].strip()
    missing = [n for n in names if versions.get(n) in (None, "(none)")]
    if missing:
        raise ImageBuildError(f"apt knows no candidate for {', '.join(missing)} (run `apt-get update`?)")
    return versions


def _agent_sources() -> list[Path]:
    root = paths.REPO_ROOT / "src" / "katapy"
    files = [root / "__init__.py"]
    for pkg in AGENT_PACKAGES:
        d = root / pkg
        if not d.is_dir():
            raise ImageBuildError(f"katapy package {d} is missing (protos not generated? run `make protos`)")
        files += sorted(p for p in d.rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _python_dep_dir(dep: str) -> Path:
    import importlib.util

    top = dep.split("/")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ImageBuildError(f"Python package {top!r} is not installed in this environment")
    return Path(list(spec.submodule_search_locations)[0]).parent / dep


def cache_key(versions: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\npython={sys.version_info[:2]}\n".encode())
    # the recipe itself: this module, the cpio writer and the package list
    for f in (Path(__file__), Path(__file__).with_name("cpio.py"), IMAGE_CONFIG_DIR / "packages.txt"):
        h.update(f.read_bytes())
    for n in sorted(versions):
        h.update(f"{n}={versions[n]}\n".encode())
    for f in _agent_sources():
        h.update(str(f.relative_to(paths.REPO_ROOT)).encode() + b"\0" + f.read_bytes())
    for dep in PYTHON_DEPS:
        d = _python_dep_dir(dep)
        for f in sorted(d.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(d)).encode() + b"\0" + str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def _download(versions: dict[str, str], debs: Path) -> list[Path]:
    """The .deb of each pinned package, from the cache or ``apt-get download``."""
    debs.mkdir(parents=True, exist_ok=True)

    def cached(name: str, ver: str) -> Path | None:
        # apt-get download names files NAME_VERSION_ARCH.deb with ':' written as %3a
        found = sorted(debs.glob(f"{name}_{ver.replace(':', '%3a')}_*.deb"))
        return found[0] if found else None

    want = [f"{n}={v}" for n, v in sorted(versions.items()) if cached(n, v) is None]
    if want:
        _progress(f"downloading {len(want)} packages into {debs}")
        r = subprocess.run(["apt-get", "download", "-q", *want], cwd=debs, capture_output=True, text=True)
        if r.returncode != 0:
            raise ImageBuildError(f"apt-get download failed: {r.stderr.strip()[-2000:]}")
    files = []
    for n, v in sorted(versions.items()):
        f = cached(n, v)
        if f is None:
            raise ImageBuildError(f"apt-get download gave no .deb for {n}={v} in {debs}")
        files.append(f)
    return files


def _prune(root: Path) -> None:
    for rel in TREE_PRUNE:
        shutil.rmtree(root / rel, ignore_errors=True)
    stdlib = root / "usr/lib/python3.11"
    for rel in STDLIB_PRUNE:
        p = stdlib / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _elf_needed(path: Path) -> list[str] | None:
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    try:
        with path.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            elf = ELFFile(f)
            needed: list[str] = []
            for sec in elf.iter_sections():
                if isinstance(sec, DynamicSection):
                    needed += [t.needed for t in sec.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
            return needed
    except (ELFError, OSError):
        return None


def check_libraries(root: Path) -> None:
    """Fail if any ELF file in the image needs a shared library the image lacks."""
    libdirs = [root / d for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib", "lib")]
    problems = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            needed = _elf_needed(p)
            for lib in needed or ():
                if not any((d / lib).exists() for d in libdirs):
                    problems.append(f"{p.relative_to(root)} needs {lib}")
    if problems:
        raise ImageBuildError("guest image has unresolved shared libraries:\n  " + "\n  ".join(problems[:40]))


def _merge_into(src: Path, dst: Path) -> None:
    """Move the tree ``src`` into ``dst`` (merged-/usr), merging directories that exist on both sides."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir() and not item.is_symlink() and target.is_dir() and not target.is_symlink():
            _merge_into(item, target)
        elif not target.exists() and not target.is_symlink():
            item.rename(target)
    shutil.rmtree(src)


def _populate(root: Path, debs: list[Path]) -> None:
    for deb in debs:
        r = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
        if r.returncode != 0:
            raise ImageBuildError(f"dpkg-deb -x {deb} failed: {r.stderr.strip()}")
    # Debian 12 is merged-/usr: the packages' /lib, /bin, /sbin content lands under usr via these links
    for d in ("bin", "sbin", "lib", "lib64"):
        src = root / d
        if src.is_dir() and not src.is_symlink():
            _merge_into(src, root / "usr" / d)
        if not src.exists() and (root / "usr" / d).exists():
            src.symlink_to(f"usr/{d}")
    bb = root / "usr/bin/busybox"
    if not bb.exists():
        raise ImageBuildError("busybox-static did not provide /bin/busybox")
    applets = subprocess.run([str(bb), "--list"], capture_output=True, text=True).stdout.split()
    for a in applets:
        link = root / "usr/bin" / a
        if not link.exists() and not link.is_symlink() and a not in ("busybox",):
            link.symlink_to("busybox")
    py = root / "usr/bin/python3"
    if not py.exists():
        py.symlink_to("python3.11")


def _add_python(root: Path) -> None:
    dest = root / "usr/lib/katapy"
    src_root = paths.REPO_ROOT / "src"
    for f in _agent_sources():
        target = dest / f.relative_to(src_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    for dep in PYTHON_DEPS:
        d = _python_dep_dir(dep)
        shutil.copytree(d, dest / dep, ignore=shutil.ignore_patterns("__pycache__", "*.pyi", "tests", "testing"),
                        dirs_exist_ok=True)
        for parent in Path(dep).parents:
            if str(parent) != ".":
                (dest / parent / "__init__.py").touch() if (d.parent / "__init__.py").exists() else None
    # Compile everything the guest imports to sourceless .pyc next to where the .py was (legacy layout) and
    # drop the sources: no source stat or read at import, and a smaller image (PEP 3147 "sourceless imports").
    import py_compile

    for tree in (dest, root / "usr/lib/python3.11"):
        ok = compileall.compile_dir(str(tree), quiet=2, legacy=True, workers=1, stripdir=str(root), prependdir="/",
                                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        if not ok:
            raise ImageBuildError(f"byte-compiling {tree} failed")
        for src in tree.rglob("*.py"):
            if src.with_suffix(".pyc").exists():
                src.unlink()
        for cache in list(tree.rglob("__pycache__")):
            shutil.rmtree(cache, ignore_errors=True)


SMOKE = (
    "import katapy.agent.server, katapy.agent.network, katapy.agent.container;"
    "from google.protobuf.internal import api_implementation as a; assert a.Type() == 'upb', a.Type();"
    "from pyroute2 import IPRoute; IPRoute().close(); print('smoke ok')"
)


def _smoke_test(root: Path) -> None:
    """Run the guest's Python inside the unpacked image (chroot): the agent's imports must resolve there.

    (crun is covered by check_libraries; running it needs /proc, which a bare chroot lacks.)"""
    if os.geteuid() != 0:
        _progress("not root: skipping the in-image smoke test")
        return
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "/usr/lib/katapy", "PYTHONDONTWRITEBYTECODE": "1"}
    for argv in (["/usr/bin/python3.11", "-S", "-c", SMOKE],):
        r = subprocess.run(["/usr/sbin/chroot", str(root), *argv], capture_output=True, text=True, env=env, timeout=120)
        if r.returncode != 0:
            raise ImageBuildError(f"in-image smoke test `{' '.join(argv[:2])}` failed: {(r.stderr or r.stdout)[-1500:]}")


def build(force: bool = False, config_dir: Path = IMAGE_CONFIG_DIR) -> GuestImage:
    names = package_names(config_dir)
    versions = resolve_versions(names)
    key = cache_key(versions)
    entry = paths.cache_dir() / "image" / key
    out = entry / "katapy-initramfs.cpio"
    manifest_path = entry / "manifest.json"
    if not force and manifest_path.is_file() and out.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("sha256") == _sha256(out):
            _progress(f"cached at {out} ({out.stat().st_size / 1e6:.1f} MB)")
            _link(out)
            return GuestImage(out, manifest)
        _progress(f"cache entry {out} does not match its manifest; rebuilding")
    t0 = time.monotonic()
    debs = _download(versions, paths.cache_dir() / "debs")
    entry.mkdir(parents=True, exist_ok=True)
    root = entry / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    _progress(f"unpacking {len(debs)} packages")
    _populate(root, debs)
    _prune(root)
    _progress("adding the agent and compiling .pyc")
    _add_python(root)
    check_libraries(root)
    _smoke_test(root)
    for d in ("proc", "sys", "dev", "run", "tmp", "etc", "root", "var", "mnt"):
        (root / d).mkdir(exist_ok=True)
    (root / "init").write_text(INIT_SCRIPT)
    (root / "init").chmod(0o755)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")

    def fill(w: CpioWriter) -> None:
        w.tree(root)
        w.char_device("dev/console", 5, 1)
        w.char_device("dev/null", 1, 3, 0o666)

    _progress("writing the initramfs")
    write_archive(out, fill)  # uncompressed: gunzip under TCG cost ~2.5 s of boot (measured)
    size = out.stat().st_size
    manifest = {"key": key, "packages": versions, "sha256": _sha256(out), "bytes": size,
                "unpacked_bytes": sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())}
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    shutil.rmtree(root)
    _progress(f"built {out} in {time.monotonic() - t0:.0f} s: {size / 1e6:.1f} MB archive, "
              f"{manifest['unpacked_bytes'] / 1e6:.1f} MB unpacked")
    _link(out)
    return GuestImage(out, manifest)


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _link(out: Path) -> None:
    link = paths.guest_initramfs()
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name("." + link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out)
    tmp.replace(link)
