#!/usr/bin/env bash
# Install the Debian packages katapy needs, once: fast when all are present.
set -euo pipefail
PKGS=(containerd runc crun qemu-system-x86 linux-source-6.1 build-essential flex bison bc
      libelf-dev libssl-dev libffi-dev busybox-static cpio e2fsprogs erofs-utils
      containernetworking-plugins iproute2 iptables kmod python3-venv prometheus)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup-deps: all Debian packages present"
fi
