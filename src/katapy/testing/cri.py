"""A private containerd with the CRI plugin, CNI bridge networking, and a CRI v1 client (grpcio).

What kubelet does to run a pod, done by tests and the CRI benchmark against
their own containerd: own root, state and socket; CNI from Debian's
containernetworking-plugins (/usr/lib/cni) with a bridge + host-local
conflist in a private conf dir (own bridge name, own subnet, own IPAM data
dir); runtimes ``runc`` and ``katapy`` (configs/containerd-katapy.toml merged
in by scripts/containerd-config.py, so the shipped stanza is what is tested).
Images are built locally and imported with ``ctr -n k8s.io images import``;
nothing is pulled.  ``cleanup`` stops containerd, its shims and removes the
bridge, mounts and directories.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from katapy.pb import cri_api_pb2 as cri

REPO = Path(__file__).resolve().parents[3]
CNI_BIN = Path("/usr/lib/cni")
BUSYBOX_IMAGE = "docker.io/katapy/busybox:latest"
PAUSE_IMAGE = "docker.io/katapy/pause:latest"
CRI_NAMESPACE = "k8s.io"

CONFIG = """version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[debug]
  level = "{level}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"""


def _containerd_config_module() -> Any:
    spec = importlib.util.spec_from_file_location("katapy_containerd_config", REPO / "scripts" / "containerd-config.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass(frozen=True)
class CniNet:
    """The bridge network this containerd's pods get."""

    bridge: str
    subnet_prefix: str  # "10.253.N"

    @property
    def gateway(self) -> str:
        return f"{self.subnet_prefix}.1"

    @property
    def subnet(self) -> str:
        return f"{self.subnet_prefix}.0/24"


class CriClient:
    """CRI v1 RuntimeService/ImageService over a unix socket, the calls kubelet makes."""

    def __init__(self, address: str, timeout: float = 120.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.timeout = timeout

    def call(self, service: str, method: str, request: Any, response_cls: type, timeout: float | None = None) -> Any:
        fn = self.channel.unary_unary(f"/runtime.v1.{service}/{method}",
                                      request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=response_cls.FromString)
        return fn(request, timeout=timeout or self.timeout)

    def runtime(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return self.call("RuntimeService", method, request, getattr(cri, f"{method}Response"), timeout)

    def close(self) -> None:
        self.channel.close()

    # -- kubelet-like helpers -------------------------------------------------------
    @staticmethod
    def pod_config(name: str, annotations: dict[str, str] | None = None, dns: list[str] | None = None,
                   log_dir: str = "") -> Any:
        uid = uuid.uuid4().hex
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="katapy-test", attempt=0),
            hostname=name, log_directory=log_dir,
            dns_config=cri.DNSConfig(servers=dns or [], searches=["katapy.test"], options=["ndots:2"]),
            labels={"katapy-test": "1"}, annotations=annotations or {},
            linux=cri.LinuxPodSandboxConfig(),
        )

    def run_pod(self, config: Any, handler: str) -> str:
        return self.runtime("RunPodSandbox", cri.RunPodSandboxRequest(config=config, runtime_handler=handler)).pod_sandbox_id

    def create_container(self, pod_id: str, pod_config: Any, name: str, command: list[str],
                         image: str = BUSYBOX_IMAGE, linux: Any = None, tty: bool = False, stdin: bool = False,
                         mounts: list[Any] | None = None, devices: list[Any] | None = None) -> str:
        """``linux``: an optional ``cri.LinuxContainerConfig`` (security context, resources);
        ``mounts``: ``cri.Mount`` host paths; ``devices``: ``cri.Device`` host devices."""
        cfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
                                  command=command, log_path=f"{name}.log", labels={"katapy-test": "1"},
                                  linux=linux, tty=tty, stdin=stdin, mounts=mounts or [], devices=devices or [])
        req = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg, sandbox_config=pod_config)
        return self.runtime("CreateContainer", req).container_id

    def start_container(self, cid: str) -> None:
        self.runtime("StartContainer", cri.StartContainerRequest(container_id=cid))

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 30) -> Any:
        return self.runtime("ExecSync", cri.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
                            timeout=timeout + 30)

    def exec_url(self, cid: str, cmd: list[str], tty: bool = False, stdin: bool = False, stdout: bool = True,
                 stderr: bool = True) -> str:
        """CRI Exec: the streaming URL (``katapy.testing.cri_stream.RemoteCommand`` speaks it)."""
        req = cri.ExecRequest(container_id=cid, cmd=cmd, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr and not tty)
        return self.runtime("Exec", req).url

    def attach_url(self, cid: str, tty: bool = False, stdin: bool = False) -> str:
        req = cri.AttachRequest(container_id=cid, stdin=stdin, tty=tty, stdout=True, stderr=not tty)
        return self.runtime("Attach", req).url

    def port_forward_url(self, pod_id: str, port: int) -> str:
        return self.runtime("PortForward", cri.PortForwardRequest(pod_sandbox_id=pod_id, port=[port])).url

    def update_resources(self, cid: str, resources: Any) -> None:
        self.runtime("UpdateContainerResources",
                     cri.UpdateContainerResourcesRequest(container_id=cid, linux=resources))

    def reopen_log(self, cid: str) -> None:
        self.runtime("ReopenContainerLog", cri.ReopenContainerLogRequest(container_id=cid))

    def container_status(self, cid: str) -> Any:
        return self.runtime("ContainerStatus", cri.ContainerStatusRequest(container_id=cid)).status

    def pod_status(self, pod_id: str) -> Any:
        return self.runtime("PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))

    def list_containers(self, pod_id: str = "") -> list[Any]:
        req = cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self.runtime("ListContainers", req).containers)

    def list_pods(self) -> list[Any]:
        return list(self.runtime("ListPodSandbox", cri.ListPodSandboxRequest()).items)

    def stop_container(self, cid: str, timeout: int = 5) -> None:
        self.runtime("StopContainer", cri.StopContainerRequest(container_id=cid, timeout=timeout))

    def remove_container(self, cid: str) -> None:
        self.runtime("RemoveContainer", cri.RemoveContainerRequest(container_id=cid))

    def stop_pod(self, pod_id: str) -> None:
        self.runtime("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod(self, pod_id: str) -> None:
        self.runtime("RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def wait_state(self, cid: str, state: int, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            st = self.container_status(cid)
            if st.state == state or time.monotonic() > deadline:
                return st
            time.sleep(0.2)


class PrivateCriContainerd:
    """containerd 1.6 with CRI on a private socket; katapy's shim from this checkout."""

    def __init__(self, base: Path, katapy_config: Path | None = None, subnet_octet: int | None = None,
                 level: str = "info", client_timeout: float = 120.0) -> None:
        """``client_timeout``: the CRI client's per-call deadline (kubelet's runtime-request-timeout, 2 min)."""
        self.base = base
        self.client_timeout = client_timeout
        tag = uuid.uuid4().hex[:8]
        octet = subnet_octet if subnet_octet is not None else (os.getpid() % 200) + 20
        self.net = CniNet(bridge=f"kpbr{tag}", subnet_prefix=f"10.253.{octet}")
        self.root, self.state = base / "root", base / "state"
        self.address = str(base / "c.sock")
        self.bin, self.cni_conf, self.ipam = base / "bin", base / "cni", base / "ipam"
        # short: a CRI sandbox id is 64 characters and the VM's unix sockets live under
        # <KATAPY_STATE>/<sandbox id>/vm/ (sun_path holds 107 bytes)
        self.katapy_state = Path("/run") / f"kp-{tag}"
        self.katapy_config = katapy_config
        self.log_path = base / "containerd.log"
        self.level = level
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: CriClient | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        env["PYTHONPATH"] = str(REPO / "src")
        env["KATAPY_STATE"] = str(self.katapy_state)
        return env

    def _write_config(self) -> Path:
        text = CONFIG.format(root=self.root, state=self.state, address=self.address, level=self.level,
                             pause=PAUSE_IMAGE, cni_bin=CNI_BIN, cni_conf=self.cni_conf)
        if self.katapy_config is not None:
            merged, _ = _containerd_config_module().merge(text, str(self.katapy_config))
            text = merged or text
        cfg = self.base / "config.toml"
        cfg.write_text(text)
        return cfg

    def _write_cni(self) -> None:
        self.cni_conf.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "0.4.0", "name": f"katapy-{self.net.bridge}",
            "plugins": [{
                "type": "bridge", "bridge": self.net.bridge, "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": self.net.subnet, "gateway": self.net.gateway}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.ipam)},
            }],
        }
        (self.cni_conf / "10-katapy-test.conflist").write_text(json.dumps(conflist, indent=1))

    def _install_shim(self) -> None:
        self.bin.mkdir(parents=True, exist_ok=True)
        wrapper = self.bin / "containerd-shim-katapy-v2"
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO / 'src'} exec {sys.executable} -m katapy.shim.main \"$@\"\n")
        wrapper.chmod(0o755)

    def start(self, timeout: float = 60.0) -> None:
        for d in (self.root, self.state, self.katapy_state, self.ipam):
            d.mkdir(parents=True, exist_ok=True)
        self._install_shim()
        self._write_cni()
        cfg = self._write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=log, stderr=log,
                                     env=self.env(), start_new_session=True)
        log.close()
        self.client = CriClient(self.address, timeout=self.client_timeout)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log_path.read_text()[-3000:]}")
            try:
                self.client.runtime("Version", cri.VersionRequest(version="v1"), timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"CRI did not answer in {timeout}s: {self.log_path.read_text()[-3000:]}")
                time.sleep(0.2)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = ["ctr", "--address", self.address, "--namespace", CRI_NAMESPACE, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return res

    def import_images(self) -> None:
        """busybox (app containers) and pause (busybox ``sleep inf``) built locally, imported into k8s.io."""
        from katapy.testing.busybox_image import build

        self.ctr("images", "import", str(build(self.base / "busybox.tar", BUSYBOX_IMAGE)))
        self.ctr("images", "import", str(build(self.base / "pause.tar", PAUSE_IMAGE, entrypoint=["sleep", "inf"])))
        # the CRI plugin learns of imported images from containerd's events; wait until it sees both
        deadline = time.monotonic() + 30
        assert self.client is not None
        while time.monotonic() < deadline:
            tags = {t for img in self.client.call("ImageService", "ListImages", cri.ListImagesRequest(),
                                                  cri.ListImagesResponse).images for t in img.repo_tags}
            if {BUSYBOX_IMAGE, PAUSE_IMAGE} <= tags:
                return
            time.sleep(0.2)
        raise RuntimeError(f"CRI does not list the imported images (has {sorted(tags)})")

    # -- what is left behind ----------------------------------------------------------
    def shim_pids(self) -> list[int]:
        """Pids of shims (runc or katapy) started by this containerd: their argv names its socket."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.address.encode() in argv and any(b"shim" in a for a in argv[:3]):
                found.append(int(entry))
        return sorted(found)

    def mounts_under(self, *paths: Path) -> list[str]:
        out = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                p = line.split()[4]
                if any(p.startswith(str(x)) for x in paths):
                    out.append(p)
        return out

    def katapy_leftovers(self) -> list[str]:
        return sorted(str(p) for p in self.katapy_state.iterdir()) if self.katapy_state.exists() else []

    def qemu_pids(self) -> list[int]:
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if str(self.katapy_state).encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                        if b"qemu" in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]:
                            out.append(int(entry))
                except OSError:
                    continue
        return out

    # -- teardown -----------------------------------------------------------------------
    def remove_all_pods(self) -> None:
        if self.client is None or self.proc is None or self.proc.poll() is not None:
            return
        try:
            for pod in self.client.list_pods():
                try:
                    self.client.stop_pod(pod.id)
                    self.client.remove_pod(pod.id)
                except grpc.RpcError:
                    pass
        except grpc.RpcError:
            pass

    def cleanup(self) -> None:
        self.remove_all_pods()
        if self.client is not None:
            self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.shim_pids() + self.qemu_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in sorted(self.mounts_under(self.base), key=len, reverse=True):
            subprocess.run(["umount", "-l", p], check=False)
        subprocess.run(["ip", "link", "del", self.net.bridge], capture_output=True, check=False)
        for p in sorted(self.mounts_under(self.katapy_state), key=len, reverse=True):
            subprocess.run(["umount", "-l", p], check=False)
        shutil.rmtree(self.katapy_state, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)
