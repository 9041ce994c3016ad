"""Test-made network namespaces: a "pod" netns with a veth whose peer sits in a "host" netns.

Stands in for what the CNI bridge plugin leaves: eth0 with an address, a
connected route and a default route via the host end.  Everything is made
with ip(8) and removed by ``close``.
"""
from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def ns_run(ns: str, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)


@dataclass
class VethPod:
    pod_ns: str
    host_ns: str
    pod_ip: str
    host_ip: str
    prefix: int = 24

    @property
    def pod_path(self) -> str:
        return f"/var/run/netns/{self.pod_ns}"

    @classmethod
    def create(cls, subnet_octet: int, mtu: int = 1400) -> VethPod:
        tag = uuid.uuid4().hex[:8]
        pod = cls(f"kp-pod-{tag}", f"kp-host-{tag}", f"10.251.{subnet_octet}.2", f"10.251.{subnet_octet}.1")
        try:
            ip("netns", "add", pod.pod_ns)
            ip("netns", "add", pod.host_ns)
            ip("-n", pod.pod_ns, "link", "add", "eth0", "mtu", str(mtu), "type", "veth",
               "peer", "name", "vhost0", "netns", pod.host_ns)
            ip("-n", pod.host_ns, "link", "set", "vhost0", "mtu", str(mtu), "up")
            ip("-n", pod.host_ns, "addr", "add", f"{pod.host_ip}/24", "dev", "vhost0")
            ip("-n", pod.pod_ns, "link", "set", "lo", "up")
            ip("-n", pod.pod_ns, "link", "set", "eth0", "up")
            ip("-n", pod.pod_ns, "addr", "add", f"{pod.pod_ip}/24", "dev", "eth0")
            ip("-n", pod.pod_ns, "route", "add", "default", "via", pod.host_ip, "dev", "eth0")
        except BaseException:
            pod.close()
            raise
        return pod

    def links(self) -> str:
        return ip("-n", self.pod_ns, "-o", "link", "show", check=False).stdout

    def ingress_filters(self, dev: str) -> str:
        return subprocess.run(["tc", "-n", self.pod_ns, "filter", "show", "dev", dev, "ingress"],
                              capture_output=True, text=True).stdout

    def close(self) -> None:
        for ns in (self.pod_ns, self.host_ns):
            if os.path.exists(f"/var/run/netns/{ns}"):
                ip("netns", "del", ns, check=False)
