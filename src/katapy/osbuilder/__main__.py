"""`katapy osbuilder` / `python -m katapy.osbuilder`: build the guest kernel and image."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="katapy osbuilder", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernel", help="build (or reuse from cache) a kernel")
    k.add_argument("--flavor", default="guest", help="guest | harness")
    k.add_argument("--force", action="store_true", help="rebuild even if cached")
    i = sub.add_parser("image", help="build (or reuse from cache) the guest initramfs")
    i.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.what == "kernel":
            from katapy.osbuilder import kernel

            b = kernel.build(args.flavor, force=args.force)
            print(b.bzimage)
        else:
            from katapy.osbuilder import image

            print(image.build(force=args.force).path)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        name = type(exc).__name__
        print(f"osbuilder: error: {name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
