"""Build katapy's guest kernel (and the nested-KVM harness kernel) from Debian's linux-source-6.1.

The configuration is ``make tinyconfig`` plus katapy's own fragments in
``configs/guest-kernel/`` (``katapy.conf`` for both; ``containers.conf`` --
what containers ask of the pod's kernel: bridges, veth, netfilter, tc -- for
the guest only; ``harness.conf`` for the harness's L1).  After ``olddefconfig`` every option a fragment
asks for must be in the resolved config, or the build fails and names them.

Builds are cached under ``<cache>/kernel/<flavor>-<key>/``, keyed by a hash of
the fragments, the patches in ``configs/guest-kernel/patches/`` and the source
package version.  A finished entry has a ``manifest.json`` with the sha256 of
each output; an entry whose outputs do not match it is reported as corrupt
and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from katapy import paths

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_PACKAGE = "linux-source-6.1"
FRAGMENT_DIR = paths.REPO_ROOT / "configs" / "guest-kernel"
FLAVORS: dict[str, tuple[str, ...]] = {
    "guest": ("katapy.conf", "containers.conf"),
    "harness": ("katapy.conf", "harness.conf"),
}
ARTIFACT_NAMES = {"guest": ("vmlinux", "bzImage"), "harness": ("harness-vmlinux", "harness-bzImage")}
BUILDER_VERSION = "1"  # bump when this file changes how a kernel is built

_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")


class KernelBuildError(Exception):
    pass


@dataclass(frozen=True)
class KernelBuild:
    flavor: str
    directory: Path

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def bzimage(self) -> Path:
        return self.directory / "bzImage"

    @property
    def config(self) -> Path:
        return self.directory / "config"


def _progress(msg: str) -> None:
    print(f"osbuilder: kernel: {msg}", file=sys.stderr, flush=True)


def source_version() -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE], capture_output=True, text=True
    )
    if out.returncode != 0 or not out.stdout:
        raise KernelBuildError(f"{SOURCE_PACKAGE} is not installed (run `make deps`): {out.stderr.strip()}")
    return out.stdout.strip()


def parse_fragment(path: Path) -> dict[str, str]:
    """``CONFIG_X=value`` lines of a fragment; comments and blanks ignored; anything else is an error."""
    if not path.is_file():
        raise KernelBuildError(f"kernel config fragment {path} does not exist")
    options: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _OPTION.match(line)
        if m is None:
            raise KernelBuildError(f"{path}:{n}: not a kernel config line: {line!r}")
        options[m.group(1)] = m.group(2)
    return options


def fragments_for(flavor: str, fragment_dir: Path = FRAGMENT_DIR) -> list[Path]:
    if flavor not in FLAVORS:
        raise KernelBuildError(f"unknown kernel flavor {flavor!r} (known: {', '.join(FLAVORS)})")
    return [fragment_dir / name for name in FLAVORS[flavor]]


def patches(fragment_dir: Path = FRAGMENT_DIR) -> list[Path]:
    d = fragment_dir / "patches"
    return sorted(d.glob("*.patch")) if d.is_dir() else []


def cache_key(flavor: str, fragment_dir: Path = FRAGMENT_DIR) -> str:
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\nflavor={flavor}\nsource={source_version()}\n".encode())
    for p in fragments_for(flavor, fragment_dir) + patches(fragment_dir):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def missing_options(wanted: dict[str, str], resolved_config: Path) -> list[str]:
    """Options the fragments ask for that the resolved .config does not have."""
    have: dict[str, str] = {}
    for line in resolved_config.read_text().splitlines():
        m = _OPTION.match(line)
        if m:
            have[m.group(1)] = m.group(2)
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            have[line[2:-11]] = "n"
    missing = []
    for opt, val in wanted.items():
        got = have.get(opt, "n")
        if got != val:
            missing.append(f"{opt}={val} (resolved: {got})")
    return missing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(build: KernelBuild) -> str | None:
    """None if the cache entry is complete and intact, else what is wrong with it."""
    manifest = build.directory / "manifest.json"
    if not manifest.is_file():
        return "no manifest (unfinished build)"
    try:
        sums = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is unreadable: {exc}"
    for name, digest in sums.items():
        f = build.directory / name
        if not f.is_file():
            return f"{f} is missing"
        if _sha256(f) != digest:
            return f"{f} does not match its manifest checksum"
    return None


def _source_tree() -> Path:
    src = paths.cache_dir() / "src" / f"linux-source-6.1-{source_version()}"
    if (src / "Makefile").is_file() and (src / ".katapy-extracted").exists():
        return src
    if not SOURCE_TARBALL.is_file():
        raise KernelBuildError(f"kernel source {SOURCE_TARBALL} is missing (install {SOURCE_PACKAGE})")
    _progress(f"extracting {SOURCE_TARBALL} into {src.parent}")
    tmp = src.parent / f".extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(SOURCE_TARBALL) as tf:
        tf.extractall(tmp, filter="tar")
    (tmp / "linux-source-6.1" / ".katapy-extracted").touch()
    shutil.rmtree(src, ignore_errors=True)
    (tmp / "linux-source-6.1").rename(src)
    shutil.rmtree(tmp, ignore_errors=True)
    return src


#: seconds between two progress lines of a kernel build
PROGRESS_EVERY_S = 20.0
#: kbuild's lines for one step of work (a compile, an assembly, a link, ...), counted in the build log
_STEP = re.compile(rb"^  (CC|AS|LD|AR|HOSTCC|HOSTLD|OBJCOPY|GEN|UPD|CPP|VDSO|RELOCS|MKPIGGY|ZOFFSET|VOFFSET) ", re.M)
#: steps of a full guest or harness build (tinyconfig + fragments, 6.1), measured: the estimate before any
#: build on this machine recorded its own count
DEFAULT_STEPS = 1850


def _steps(log: Path) -> int:
    try:
        return len(_STEP.findall(log.read_bytes()))
    except OSError:
        return 0


def expected_build(flavor: str) -> tuple[int, float | None]:
    """(steps, seconds) the last recorded build of ``flavor`` on this machine took, from any cache entry's
    manifest; (DEFAULT_STEPS, None) when none recorded it."""
    best: tuple[int, float | None] = (DEFAULT_STEPS, None)
    for m in (paths.cache_dir() / "kernel").glob(f"{flavor}-*/manifest.json"):
        try:
            rec = json.loads(m.read_text())
            steps, secs = int(rec["steps"]), float(rec["build_s"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if steps > 0 and secs > 0:
            best = (steps, secs)
    return best


def _report_progress(flavor: str, log: Path, done: Any, t0: float, expected: tuple[int, float | None]) -> None:
    """A line every PROGRESS_EVERY_S while kbuild runs: steps done of those expected, elapsed, time left."""
    want, _ = expected
    while not done.wait(PROGRESS_EVERY_S):
        n, elapsed = _steps(log), time.monotonic() - t0
        frac = min(n / want, 0.99) if want else 0.0
        left = f", ~{elapsed / frac * (1 - frac) / 60:.0f} min left" if frac > 0.05 else ""
        _progress(f"{flavor}: {n}/~{want} build steps ({frac:.0%}), {elapsed / 60:.1f} min{left}")


def _make(src: Path, out: Path, *targets: str, log: Path, progress: tuple[str, tuple[int, float | None]] | None = None) -> None:
    import threading

    cmd = ["make", "-C", str(src), f"O={out}", "ARCH=x86_64", f"-j{os.cpu_count() or 2}", *targets]
    done = threading.Event()
    if progress is not None:
        threading.Thread(target=_report_progress, args=(progress[0], log, done, time.monotonic(), progress[1]),
                         daemon=True).start()
    try:
        with log.open("ab") as lf:
            r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT)
    finally:
        done.set()
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise KernelBuildError(f"`{' '.join(cmd)}` failed ({r.returncode}); last lines of {log}:\n" + "\n".join(tail))


def build(flavor: str, fragment_dir: Path = FRAGMENT_DIR, force: bool = False) -> KernelBuild:
    frags = fragments_for(flavor, fragment_dir)
    wanted: dict[str, str] = {}
    for f in frags:
        wanted.update(parse_fragment(f))
    key = cache_key(flavor, fragment_dir)
    entry = KernelBuild(flavor, paths.cache_dir() / "kernel" / f"{flavor}-{key}")
    if not force:
        problem = verify(entry)
        if problem is None:
            _progress(f"{flavor}: cached at {entry.directory}")
            link_artifacts(entry)
            return entry
        if entry.directory.exists():
            _progress(f"{flavor}: cache entry {entry.directory} is corrupt ({problem}); rebuilding")
    src = _source_tree()
    out = entry.directory / "build"
    entry.directory.mkdir(parents=True, exist_ok=True)
    (entry.directory / "manifest.json").unlink(missing_ok=True)
    log = entry.directory / "build.log"
    log.write_text("")
    for p in patches(fragment_dir):
        # patches are applied to a private copy of the tree, never the shared one
        raise KernelBuildError(f"kernel patches are not supported by this builder yet: {p}")
    t0 = time.monotonic()
    _progress(f"{flavor}: configuring (tinyconfig + {', '.join(f.name for f in frags)}) in {out}")
    out.mkdir(parents=True, exist_ok=True)
    _make(src, out, "tinyconfig", log=log)
    with (out / ".config").open("a") as cfg:
        for opt, val in wanted.items():
            cfg.write(f"{opt}={val}\n")
    _make(src, out, "olddefconfig", log=log)
    missing = missing_options(wanted, out / ".config")
    if missing:
        raise KernelBuildError(
            f"the resolved kernel config lacks options that {', '.join(str(f) for f in frags)} ask for:\n  "
            + "\n  ".join(missing)
        )
    steps, secs = expected = expected_build(flavor)
    took = f"~{secs / 60:.0f} min here last time" if secs else f"several minutes on {os.cpu_count()} cores"
    _progress(f"{flavor}: building vmlinux and bzImage, ~{steps} steps, {took} (log: {log})")
    _make(src, out, "vmlinux", "bzImage", log=log, progress=(flavor, expected))
    shutil.copyfile(out / "vmlinux", entry.vmlinux)
    shutil.copyfile(out / "arch" / "x86" / "boot" / "bzImage", entry.bzimage)
    shutil.copyfile(out / ".config", entry.config)
    sums = {n: _sha256(entry.directory / n) for n in ("vmlinux", "bzImage", "config")}
    record = {"key": key, "flavor": flavor, "sha256": sums, "steps": _steps(log), "build_s": round(time.monotonic() - t0)}
    (entry.directory / "manifest.json").write_text(json.dumps(record, indent=1))
    _progress(f"{flavor}: built in {time.monotonic() - t0:.0f} s: bzImage {entry.bzimage.stat().st_size // 1024} KiB")
    link_artifacts(entry)
    return entry


def link_artifacts(entry: KernelBuild) -> None:
    d = paths.artifacts_dir()
    d.mkdir(parents=True, exist_ok=True)
    vml, bz = ARTIFACT_NAMES[entry.flavor]
    for name, target in ((vml, entry.vmlinux), (bz, entry.bzimage)):
        link = d / name
        tmp = d / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(link)
