"""`katapy env`: katapy's environment as TOML (like `kata-runtime kata-env`)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from katapy import __version__, paths
from katapy.cli import check


def _q(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(str(v))


def collect() -> dict[str, dict[str, object]]:
    from katapy import config
    from katapy.hypervisor.selection import decide, kvm_flavor

    try:
        cfg = config.load(check_files=False)
        cfg_path, hv_name = str(cfg.source or "built-in defaults"), cfg.hypervisor.name
        kernel, initrd = cfg.hypervisor.kernel, cfg.hypervisor.initrd
    except Exception as exc:  # noqa: BLE001
        cfg_path, hv_name = f"invalid: {exc}", "auto"
        kernel, initrd = paths.guest_bzimage(), paths.guest_initramfs()
    flavor = kvm_flavor()
    d = decide(hv_name, flavor)
    manifest = initrd.resolve().parent / "manifest.json"
    pkgs = json.loads(manifest.read_text()).get("packages", {}) if manifest.is_file() else {}
    return {
        "Runtime": {"Version": __version__, "Config": cfg_path, "Python": platform.python_version(),
                    "StateDir": str(paths.state_dir()), "Cache": str(paths.cache_dir())},
        "Hypervisor": {"Configured": hv_name, "Selected": d.name, "Accel": d.accel, "Reason": d.reason},
        "Kernel": {"Path": str(kernel), "Exists": kernel.exists(), "Version": check.kernel_version_of(kernel) or ""},
        "Image": {"Path": str(initrd), "Exists": initrd.exists(),
                  "Packages": ", ".join(f"{k}={v}" for k, v in sorted(pkgs.items()))},
        "Host": {"Kernel": platform.release(), "KvmFlavor": flavor, "KvmApi": check.kvm_api_version() or 0,
                 "Cgroups": check.cgroup_version(), "Containerd": check.containerd_version() or "",
                 "Tun": os.path.exists("/dev/net/tun")},
    }


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="katapy env", description=__doc__).parse_args(argv)
    for section, values in collect().items():
        print(f"[{section}]")
        for k, v in values.items():
            print(f"  {k} = {_q(v)}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
