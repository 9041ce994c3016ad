"""Pods through containerd's CRI plugin, the calls kubelet makes, with runc and with katapy.

The same scenario runs with runtime handler ``runc`` (proves the CRI client,
containerd config and CNI set-up) and ``katapy`` (one VM per pod, its netns
carried in with tc redirect).  Every test checks that Stop/Remove leave
nothing behind: the CNI netns, veths on the bridge, shim and QEMU
processes, mounts, katapy state.
"""
from __future__ import annotations

import http.server
import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from katapy.pb import cri_api_pb2 as cri

from .conftest import katapy_unavailable

# katapy: one VM per pod (QEMU/TCG here: ~10-30 s per pod)
HANDLERS = ["runc", pytest.param("katapy", marks=[pytest.mark.slow, pytest.mark.guest])]
# the main scenario also with handler katapy on the built-in VMM: hardware KVM, or delegated to the nested
# KVM harness (kvm-marked); the runtime handler is "katapy" either way, its containerd's katapy configuration
# names the backend.  (handler, hypervisor): hypervisor None is runc's.
POD_VARIANTS = [
    pytest.param("runc", None, id="runc"),
    pytest.param("katapy", "qemu", marks=[pytest.mark.slow, pytest.mark.guest], id="katapy"),
    pytest.param("katapy", "builtin", marks=[pytest.mark.slow, pytest.mark.guest, pytest.mark.kvm],
                 id="katapy-builtin"),
]
pytestmark = pytest.mark.containerd
RUNNING, EXITED = cri.CONTAINER_RUNNING, cri.CONTAINER_EXITED
SERVER_CMD = ["sh", "-c", "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"]


@pytest.fixture
def handler(request):
    return request.param


def _need(handler: str, hypervisor: str = "qemu") -> None:
    if handler == "katapy":
        why = katapy_unavailable(hypervisor)
        if why:
            pytest.skip(f"katapy pods on {hypervisor} cannot run here: {why}")


def _containerd_for(request, hypervisor: str | None):
    """The module's private CRI containerd whose katapy runtime runs on ``hypervisor`` (None: runc's, any)."""
    return request.getfixturevalue("cri_containerd_builtin" if hypervisor == "builtin" else "cri_containerd")


def _log_mark(c) -> int:
    return c.log_path.stat().st_size if c.log_path.exists() else 0


def _assert_backend(c, start: int, hypervisor: str) -> None:
    """The shim's own log line says which backend ran the sandbox (no silent fallback to another VMM)."""
    with open(c.log_path, errors="replace") as f:
        f.seek(start)
        started = [ln for ln in f if "event='sandbox started'" in ln]
    assert started, "no 'sandbox started' line in the shim log"
    assert all(f"backend='{hypervisor}'" in ln for ln in started), started


def _netns_of(c, pod_id: str) -> str:
    info = json.loads(c.client.pod_status(pod_id).info["info"])
    for ns in info["runtimeSpec"]["linux"]["namespaces"]:
        if ns["type"] == "network":
            return ns["path"]
    raise AssertionError("the sandbox has no network namespace path")


def _cni_netns() -> set[str]:
    d = Path("/var/run/netns")
    return {p.name for p in d.glob("cni-*")} if d.exists() else set()


def _bridge_ports(c) -> str:
    import subprocess

    return subprocess.run(["ip", "-o", "link", "show", "master", c.net.bridge], capture_output=True, text=True).stdout


def _link_names(out: str) -> set[str]:
    return {ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines() if ln.count(":") >= 2}


def _links_and_ingress(netns_fd: int) -> list[str]:
    """Network devices, and ingress qdiscs, in the netns ``netns_fd`` holds (this process's fd) beyond those
    every new netns has (lo, and the fallback tunnels -- sit0, tunl0, ... -- of tunnel modules loaded)."""
    import subprocess

    def run(*cmd: str, netns: str) -> str:
        return subprocess.run(["nsenter", netns, *cmd], capture_output=True, text=True, pass_fds=(netns_fd,),
                              check=True).stdout

    fresh = subprocess.run(["unshare", "--net", "ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    pod = f"--net=/proc/self/fd/{netns_fd}"
    extra = _link_names(run("ip", "-o", "link", "show", netns=pod)) - _link_names(fresh)
    return [f"link {x}" for x in sorted(extra)] + [q for q in run("tc", "qdisc", "show", netns=pod).splitlines()
                                                   if "ingress" in q]


def _assert_nothing_left(c, netns_paths: list[str], pod_ids: list[str] | None = None,
                         held_netns: int | None = None) -> None:
    """``held_netns``: an fd keeping the pod's netns alive after CNI removed it, so that what the runtime itself
    left in it (katapy's taps and their tc ingress redirects) is still seen -- the kernel would otherwise
    delete them with the netns."""
    from katapy.resource.cgroups import SandboxCgroup

    deadline = time.monotonic() + 20
    while True:
        left = {
            "in the pod netns": _links_and_ingress(held_netns) if held_netns is not None else [],
            "cgroups": [str(d) for p in pod_ids or [] for d in SandboxCgroup.paths_for(p) if d.exists()],
            "netns": [p for p in netns_paths if Path(p).exists()],
            "bridge ports": _bridge_ports(c).strip(),
            "shims": c.shim_pids(),
            "qemu": c.qemu_pids(),
            "katapy state": c.katapy_leftovers(),
            "mounts": [m for m in c.mounts_under(c.state, c.root, c.katapy_state) if "/io.containerd.grpc.v1.cri/" in m
                       or "/io.containerd.runtime.v2.task/" in m or str(c.katapy_state) in m],
            "pods": [p.id for p in c.client.list_pods()],
        }
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not any(left.values()), f"left behind: { {k: v for k, v in left.items() if v} }"


def _run_pod(c, name: str, handler: str, annotations=None, host_pid: bool = False):
    config = c.client.pod_config(name, annotations=annotations, dns=["10.96.0.10"])
    if host_pid:
        config.linux.security_context.namespace_options.pid = cri.NODE
    try:
        pod_id = c.client.run_pod(config, handler)
    except grpc.RpcError as exc:
        tail = c.log_path.read_text()[-3000:]
        raise AssertionError(f"RunPodSandbox({handler}) failed: {exc.details()}\ncontainerd log tail:\n{tail}") from None
    return pod_id, config


def _http_get(url: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class _HostServer:
    """An HTTP server on the bridge's host address (the pod's gateway)."""

    def __init__(self, address: str) -> None:
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = b"hello-from-the-host\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((address, 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_version(cri_containerd):
    v = cri_containerd.client.runtime("Version", cri.VersionRequest(version="v1"))
    assert v.runtime_name == "containerd" and v.runtime_api_version == "v1"


def _assert_guest_dns(cl, pod_id: str, config) -> None:
    """The VM's own /etc/resolv.conf (the agent's, PID 1 of the guest) is the pod's DNS config.

    In a hostPID pod, a container in the node's PID namespace -- in a katapy pod the VM's --
    with CAP_SYS_PTRACE reads it through /proc/1/root.
    """
    linux = cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
        namespace_options=cri.NamespaceOption(pid=cri.NODE),
        capabilities=cri.Capability(add_capabilities=["SYS_PTRACE"])))
    cid = cl.create_container(pod_id, config, "guest-view", ["sleep", "3600"], linux=linux)
    try:
        cl.start_container(cid)
        assert cl.wait_state(cid, RUNNING).state == RUNNING
        r = cl.exec_sync(cid, ["cat", "/proc/1/cmdline"])
        assert b"katapy.agent" in r.stdout, r.stdout  # PID 1 is the guest agent, not this container's sleep
        r = cl.exec_sync(cid, ["cat", "/proc/1/root/etc/resolv.conf"])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        lines = r.stdout.decode().splitlines()
        assert "nameserver 10.96.0.10" in lines and "search katapy.test" in lines, lines
        assert "options ndots:2" in lines, lines
    finally:
        cl.stop_container(cid, timeout=1)
        cl.remove_container(cid)


@pytest.mark.parametrize("handler,hypervisor", POD_VARIANTS)
def test_pod_with_two_containers(request, handler, hypervisor):
    _need(handler, hypervisor or "qemu")
    c = _containerd_for(request, hypervisor)
    cl = c.client
    mark = _log_mark(c)
    pod_id, config = _run_pod(c, f"pod-{handler}", handler)
    netns = _netns_of(c, pod_id)
    held = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hypervisor is not None:
            _assert_backend(c, mark, hypervisor)
        st = cl.pod_status(pod_id).status
        assert st.state == cri.SANDBOX_READY and st.runtime_handler == handler
        pod_ip = st.network.ip
        assert pod_ip.startswith(c.net.subnet_prefix + "."), pod_ip

        server = cl.create_container(pod_id, config, "server", SERVER_CMD)
        client = cl.create_container(pod_id, config, "client", ["sleep", "3600"])
        assert cl.container_status(server).state == cri.CONTAINER_CREATED
        cl.start_container(server)
        cl.start_container(client)
        assert cl.wait_state(server, RUNNING).state == RUNNING
        assert cl.wait_state(client, RUNNING).state == RUNNING

        # localhost between the two containers of the pod
        r = cl.exec_sync(client, ["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do "
                                              "wget -q -O - http://127.0.0.1:8080/ && exit 0; sleep 1; done; exit 1"])
        assert r.exit_code == 0 and r.stdout.startswith(b"hello-from-"), (r.exit_code, r.stdout, r.stderr)
        # both see the pod's IP on eth0
        for cid in (server, client):
            r = cl.exec_sync(cid, ["ip", "-o", "-4", "addr", "show", "eth0"])
            assert r.exit_code == 0 and f" {pod_ip}/".encode() in r.stdout, r.stdout
        # each app container has its own PID namespace (this pod does not share one): never the VM's
        r = cl.exec_sync(client, ["cat", "/proc/1/cmdline"])
        assert r.exit_code == 0 and r.stdout.split(b"\0")[0] in (b"sleep", b"pause"), r.stdout
        # ExecSync output and exit code
        r = cl.exec_sync(client, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
        # DNS from the pod config
        r = cl.exec_sync(client, ["cat", "/etc/resolv.conf"])
        assert b"nameserver 10.96.0.10" in r.stdout and b"search katapy.test" in r.stdout, r.stdout

        # host -> pod at the CNI pod IP; pod -> host end of the bridge
        assert _http_get(f"http://{pod_ip}:8080/").startswith("hello-from-")
        host = _HostServer(c.net.gateway)
        try:
            r = cl.exec_sync(client, ["wget", "-q", "-O", "-", f"http://{c.net.gateway}:{host.port}/"])
            assert r.exit_code == 0 and r.stdout == b"hello-from-the-host\n", (r.stdout, r.stderr)
        finally:
            host.close()

        # a container that exits by itself: state and exit code
        short = cl.create_container(pod_id, config, "short", ["sh", "-c", "exit 7"])
        cl.start_container(short)
        st = cl.wait_state(short, EXITED)
        assert st.state == EXITED and st.exit_code == 7 and st.finished_at > 0
        states = {x.metadata.name: x.state for x in cl.list_containers(pod_id)}
        assert states == {"server": RUNNING, "client": RUNNING, "short": EXITED}

        # stats
        stats = cl.runtime("ContainerStats", cri.ContainerStatsRequest(container_id=server)).stats
        assert stats.attributes.id == server
        assert stats.memory.working_set_bytes.value > 0 and stats.cpu.usage_core_nano_seconds.value > 0
        listed = cl.runtime("ListContainerStats", cri.ListContainerStatsRequest(
            filter=cri.ContainerStatsFilter(pod_sandbox_id=pod_id))).stats
        assert {s.attributes.id for s in listed} >= {server, client}
        assert all(s.memory.working_set_bytes.value > 0 for s in listed if s.attributes.id in (server, client))

        # stop and remove
        cl.stop_container(client, timeout=2)
        st = cl.container_status(client)
        assert st.state == EXITED and st.finished_at > 0
        for cid in (server, client, short):
            cl.stop_container(cid, timeout=2)
            cl.remove_container(cid)
        assert cl.list_containers(pod_id) == []
    finally:
        c.remove_all_pods()
    try:
        _assert_nothing_left(c, [netns], [pod_id], held_netns=held)
    finally:
        os.close(held)


@pytest.mark.parametrize("handler", HANDLERS, indirect=True)
def test_two_pods_at_once(cri_containerd, handler):
    _need(handler)
    c = cri_containerd
    cl = c.client
    # the second pod is a hostPID pod: its containers share the node's PID namespace (for katapy: the VM's)
    pods = [_run_pod(c, f"twin{i}-{handler}", handler, host_pid=i == 1) for i in range(2)]
    netns = [_netns_of(c, p) for p, _ in pods]
    try:
        ips = [cl.pod_status(p).status.network.ip for p, _ in pods]
        assert len(set(ips)) == 2 and len(set(netns)) == 2
        servers = []
        for (pod_id, config) in pods:
            cid = cl.create_container(pod_id, config, "server", SERVER_CMD)
            cl.start_container(cid)
            servers.append(cid)
        for ip, (pod_id, _) in zip(ips, pods):
            body = _http_get(f"http://{ip}:8080/")
            assert body.strip() == f"hello-from-{cl.pod_status(pod_id).status.metadata.name}", body
        if handler == "katapy":
            _assert_guest_dns(cl, *pods[1])
        # stopping one pod leaves the other serving
        cl.stop_pod(pods[0][0])
        cl.remove_pod(pods[0][0])
        assert _http_get(f"http://{ips[1]}:8080/").startswith("hello-from-twin1")
    finally:
        c.remove_all_pods()
    _assert_nothing_left(c, netns, [p for p, _ in pods])


@pytest.mark.parametrize("handler", HANDLERS, indirect=True)
def test_netns_disappearing_under_a_running_pod(cri_containerd, handler):
    """CNI's netns bind mount removed behind the runtime's back: Stop/Remove still clean up everything."""
    import subprocess

    _need(handler)
    c = cri_containerd
    cl = c.client
    pod_id, config = _run_pod(c, f"vanish-{handler}", handler)
    netns = _netns_of(c, pod_id)
    try:
        cid = cl.create_container(pod_id, config, "sleeper", ["sleep", "3600"])
        cl.start_container(cid)
        assert cl.wait_state(cid, RUNNING).state == RUNNING
        subprocess.run(["umount", netns], check=True)
        Path(netns).unlink()
        cl.stop_pod(pod_id)
        cl.remove_pod(pod_id)
    finally:
        c.remove_all_pods()
    _assert_nothing_left(c, [netns], [pod_id])


def test_unknown_runtime_handler_is_refused(cri_containerd):
    c = cri_containerd
    before = _cni_netns()
    with pytest.raises(grpc.RpcError) as info:
        c.client.run_pod(c.client.pod_config("nohandler"), "no-such-handler")
    assert "no-such-handler" in info.value.details()
    assert _cni_netns() == before
    _assert_nothing_left(c, [])


@pytest.mark.parametrize("annotations,message", [
    ({"io.katapy.config.hypervisor.default_vcpus": "64"},
     "annotation io.katapy.config.hypervisor.default_vcpus='64': more vCPUs than the configuration allows "
     "([hypervisor] max_vcpus = 4)"),
    ({"io.katapy.config.hypervisor.default_memory": "999999"}, "max_memory = 2048 MiB"),
    ({"io.katapy.config.hypervisor.no_such_option": "1"},
     "annotation io.katapy.config.hypervisor.no_such_option: unknown katapy annotation"),
])
def test_katapy_refuses_bad_pod_annotations(cri_containerd, annotations, message):
    """Checked by the shim before any VM starts; containerd passes io.katapy.* through pod_annotations."""
    c = cri_containerd
    before = _cni_netns()
    with pytest.raises(grpc.RpcError) as info:
        c.client.run_pod(c.client.pod_config("badannotation", annotations=annotations), "katapy")
    assert message in info.value.details(), info.value.details()
    assert _cni_netns() == before
    _assert_nothing_left(c, [])
