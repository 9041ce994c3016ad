#!/usr/bin/env bash
# `make demo`: run a container in a katapy VM through containerd and show that
# the guest kernel, not the host's, answered.  Starts a private containerd
# (own config, root, state and socket under /run/katapy-demo) unless one is
# already serving there, imports a locally built busybox image (no registry
# needed), runs `ctr run --rm --runtime io.containerd.katapy.v2 ... uname -a`
# and stops what it started.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
DEMO="${KATAPY_DEMO_DIR:-/run/katapy-demo}"
ADDRESS="$DEMO/containerd.sock"
IMAGE="docker.io/katapy/busybox:latest"
NS="katapy-demo"
started=""

ctr_() { ctr --address "$ADDRESS" --namespace "$NS" "$@"; }

cleanup() {
    ctr_ task delete -f demo >/dev/null 2>&1 || true
    ctr_ containers rm demo >/dev/null 2>&1 || true
    if [[ -n "$started" ]]; then
        kill "$started" 2>/dev/null || true
        wait "$started" 2>/dev/null || true
        echo "demo: stopped the private containerd"
    fi
}
trap cleanup EXIT

command -v containerd-shim-katapy-v2 >/dev/null || bash "$REPO/scripts/install.sh"
mkdir -p "$DEMO"
if ! ctr --address "$ADDRESS" version >/dev/null 2>&1; then
    cat >"$DEMO/config.toml" <<TOML
version = 2
root = "$DEMO/root"
state = "$DEMO/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$ADDRESS"
[ttrpc]
  address = "$ADDRESS.ttrpc"
TOML
    containerd --config "$DEMO/config.toml" >"$DEMO/containerd.log" 2>&1 &
    started=$!
    for _ in $(seq 100); do ctr --address "$ADDRESS" version >/dev/null 2>&1 && break; sleep 0.1; done
    echo "demo: started a private containerd (pid $started, log $DEMO/containerd.log)"
fi

if ! ctr_ images ls -q | grep -qx "$IMAGE"; then
    PYTHONPATH="$REPO/src" "$PY" -m katapy.testing.busybox_image "$DEMO/busybox-oci.tar" >/dev/null
    ctr_ images import "$DEMO/busybox-oci.tar" >/dev/null
    echo "demo: imported $IMAGE (built locally from busybox-static)"
fi

echo "demo: host kernel:  $(uname -r)"
start=$(date +%s%N)
out="$(ctr_ run --rm --runtime io.containerd.katapy.v2 "$IMAGE" demo uname -a)"
end=$(date +%s%N)
echo "demo: container said: $out"
echo "demo: ctr run took $(( (end - start) / 1000000 )) ms"
guest_release="$(echo "$out" | awk '{print $3}')"
if [[ -n "$guest_release" && "$guest_release" != "$(uname -r)" ]]; then
    echo "demo: OK - the guest kernel ($guest_release) answered, not the host's ($(uname -r))"
else
    echo "demo: FAILED - expected a guest kernel release different from the host's" >&2
    exit 1
fi
