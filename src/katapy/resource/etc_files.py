"""/etc/hostname, /etc/hosts and /etc/resolv.conf for a container that has none.

CRI puts the pod's own copies in the spec as bind mounts (those are shared
by ``volumes``).  A bare ``ctr run`` has none, so katapy writes them into the
container's share directory (``<shared_dir>/<cid>/etc``) and adds bind
mounts for them, as a container engine would: hostname from the spec's
``hostname`` (else the first 12 characters of the container id), hosts with
localhost and that name, and the host's resolv.conf (the guest reaches the
same resolvers once networking is configured).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from katapy.resource.rootfs import GUEST_SHARED_DIR, container_dir

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
ETC_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


def hostname_for(spec: dict[str, Any], container_id: str) -> str:
    name = spec.get("hostname")
    return name if isinstance(name, str) and name else container_id[:12]


def render(hostname: str, resolv_conf: str) -> dict[str, str]:
    """The three files' contents."""
    hosts = (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{hostname}\n"
    )
    return {"/etc/hostname": hostname + "\n", "/etc/hosts": hosts, "/etc/resolv.conf": resolv_conf}


def add_missing(shared_dir: Path, container_id: str, spec: dict[str, Any],
                resolv_conf_source: Path = HOST_RESOLV_CONF) -> list[dict[str, Any]]:
    """Write the files the spec does not mount and return the bind mounts to append."""
    existing = {m.get("destination") for m in spec.get("mounts") or [] if isinstance(m, dict)}
    missing = [f for f in ETC_FILES if f not in existing]
    if not missing:
        return []
    try:
        resolv = resolv_conf_source.read_text()
    except OSError:
        resolv = ""
    contents = render(hostname_for(spec, container_id), resolv)
    etc = container_dir(shared_dir, container_id) / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    added = []
    for dest in missing:
        name = Path(dest).name
        (etc / name).write_text(contents[dest])
        added.append({
            "destination": dest,
            "type": "bind",
            "source": f"{GUEST_SHARED_DIR}/{container_id}/etc/{name}",
            "options": ["rbind", "rw"],
        })
    return added


RESOLV_CONF_KEYWORDS = ("nameserver", "search", "domain", "options", "sortlist")
MAX_RESOLV_CONF_BYTES = 64 << 10


def dns_from_spec(spec: dict[str, Any]) -> list[str]:
    """The pod's resolv.conf lines for the agent's CreateSandbox ``dns`` (Kata sends resolv.conf lines).

    containerd's CRI plugin writes the pod's resolv.conf from PodSandboxConfig.dns_config and bind
    mounts it at /etc/resolv.conf of the sandbox (pause) container, so that a VM runtime can set up
    the guest's DNS.  Returns [] when the spec has no such bind mount or the file cannot be read
    (e.g. ``ctr run``); comments, blank lines and unknown keywords (resolv.conf(5)) are left out.
    """
    source = ""
    for m in spec.get("mounts") or []:
        if isinstance(m, dict) and m.get("destination") == "/etc/resolv.conf" and isinstance(m.get("source"), str):
            source = m["source"]
    if not source.startswith("/"):
        return []
    try:
        with open(source, "rb") as f:
            text = f.read(MAX_RESOLV_CONF_BYTES).decode("utf-8", "replace")
    except OSError:
        return []
    lines = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] in RESOLV_CONF_KEYWORDS:
            lines.append(" ".join(words))
    return lines
