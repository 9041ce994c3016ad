#!/usr/bin/env bash
# Install katapy for containerd: the venv's console scripts on PATH (/usr/local/bin)
# and the configuration files into /etc/katapy (configuration.toml -> the
# hypervisor-specific file, as `katapy config use` switches it).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
BIN_DIR="${BIN_DIR:-/usr/local/bin}"
CONFIG_DIR="${KATAPY_CONFIG_DIR:-/etc/katapy}"

for script in containerd-shim-katapy-v2 katapy; do
    src="$VENV/bin/$script"
    if [[ ! -x "$src" ]]; then
        # no editable install yet: a wrapper that runs this checkout with the venv's Python
        case "$script" in
            containerd-shim-katapy-v2) module=katapy.shim.main ;;
            katapy) module=katapy.cli ;;
        esac
        printf '#!/bin/sh\nPYTHONPATH=%s/src exec %s/bin/python -m %s "$@"\n' "$REPO" "$VENV" "$module" >"$BIN_DIR/$script"
        chmod 0755 "$BIN_DIR/$script"
    else
        ln -sf "$src" "$BIN_DIR/$script"
    fi
    echo "installed $BIN_DIR/$script"
done

mkdir -p "$CONFIG_DIR"
for cfg in "$REPO"/configs/configuration-*.toml; do
    [[ -e "$cfg" ]] || continue
    install -m 0644 "$cfg" "$CONFIG_DIR/$(basename "$cfg")"
    echo "installed $CONFIG_DIR/$(basename "$cfg")"
done
if [[ ! -e "$CONFIG_DIR/configuration.toml" ]]; then
    # let katapy pick the backend for this host (builtin on hardware KVM, qemu otherwise)
    if [[ -e "$CONFIG_DIR/configuration-qemu.toml" ]] && ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
        ln -s configuration-qemu.toml "$CONFIG_DIR/configuration.toml"
    elif [[ -e "$CONFIG_DIR/configuration-builtin.toml" ]]; then
        ln -s configuration-builtin.toml "$CONFIG_DIR/configuration.toml"
    fi
fi
[[ -e "$CONFIG_DIR/configuration.toml" ]] && echo "active configuration: $(readlink -f "$CONFIG_DIR/configuration.toml")"
exit 0
