#!/usr/bin/env bash
# Says up front what a first `make demo` / `make test` will build and roughly how long it takes, so a
# cold machine's silent minutes are announced.  Each slow step prints its own progress as it runs
# (apt, pip, and the kernel build's "N/~M build steps ... min left" lines).  Standard tools only: it runs
# before the virtual environment exists.
set -euo pipefail
what="${1:-demo}"
cache="${KATAPY_CACHE:-/var/cache/katapy}"
cores="$(nproc 2>/dev/null || echo 2)"
todo=()
minutes=0
[[ -x .venv/bin/python ]] || { todo+=("Python virtual environment (pip, ~1 min)"); minutes=$((minutes + 1)); }
command -v containerd >/dev/null && command -v qemu-system-x86_64 >/dev/null \
    || { todo+=("Debian packages (apt, ~2 min)"); minutes=$((minutes + 2)); }
[[ -e "$cache/artifacts/bzImage" ]] \
    || { todo+=("guest kernel (kbuild, ~$((8 / cores + 1))-$((10 / cores + 2)) min on $cores cores)"); minutes=$((minutes + 10 / cores + 2)); }
if [[ "$what" == test ]]; then
    [[ -e "$cache/artifacts/harness-bzImage" ]] \
        || { todo+=("nested-KVM harness kernel (kbuild, ~$((8 / cores + 1))-$((10 / cores + 2)) min)"); minutes=$((minutes + 10 / cores + 2)); }
fi
[[ -e "$cache/artifacts/katapy-initramfs.cpio" ]] || { todo+=("guest image (~1 min)"); minutes=$((minutes + 1)); }
if ((${#todo[@]})); then
    echo "katapy: first run on this machine: building, once (cached under $cache, keyed by their inputs):"
    for t in "${todo[@]}"; do echo "  - $t"; done
    echo "katapy: about $minutes min before the $what starts; each step prints its progress."
fi
