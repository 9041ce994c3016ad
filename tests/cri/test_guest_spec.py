"""What the shim derives from a CRI sandbox/app spec for the guest: namespaces and the pod's DNS."""
from __future__ import annotations

import copy

from katapy.resource.etc_files import dns_from_spec
import pytest

from katapy.resource.namespaces import NamespaceError, amend_for_guest, check_pod_sandbox, has_namespace


def _spec(namespaces, hostname="pod-a", pod=True):
    ann = {"io.kubernetes.cri.container-type": "container"} if pod else {}
    return {"hostname": hostname, "annotations": ann, "linux": {"namespaces": namespaces}}


def test_app_container_joins_the_sandbox_containers_ipc_uts_and_pid():
    s = _spec([{"type": "pid", "path": "/proc/999999999/ns/pid"}, {"type": "ipc", "path": "/proc/999999999/ns/ipc"},
               {"type": "uts", "path": "/proc/999999999/ns/uts"}, {"type": "mount"},
               {"type": "network", "path": "/var/run/netns/cni-1"}])
    amend_for_guest(s, pod_member=True, sandbox_has_pid_ns=True, sandbox_id="sbx1")
    assert s["linux"]["namespaces"] == [{"type": "pid", "path": "container:sbx1"},
                                        {"type": "ipc", "path": "container:sbx1"},
                                        {"type": "uts", "path": "container:sbx1"}, {"type": "mount"}]
    assert s["hostname"] == "pod-a"  # the pod's UTS namespace, joined


def test_app_container_without_a_sandbox_id_is_refused():
    s = _spec([{"type": "ipc", "path": "/proc/999999999/ns/ipc"}])
    with pytest.raises(NamespaceError, match="without a sandbox id"):
        amend_for_guest(s, pod_member=True)


def test_sandbox_container_keeps_new_ipc_and_uts_namespaces_and_its_hostname():
    s = _spec([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
               {"type": "network", "path": "/var/run/netns/x"}])
    s["annotations"] = {"io.kubernetes.cri.container-type": "sandbox"}
    amend_for_guest(s, pod_member=False)
    assert s["linux"]["namespaces"] == [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    assert s["hostname"] == "pod-a"


@pytest.mark.parametrize("missing,field", [("network", "hostNetwork"), ("ipc", "hostIPC")])
def test_pod_sandbox_in_node_namespaces_is_refused(missing, field):
    full = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/x"}]
    check_pod_sandbox({"linux": {"namespaces": full}})
    with pytest.raises(NamespaceError, match=f"{field} pods are not supported by katapy"):
        check_pod_sandbox({"linux": {"namespaces": [n for n in full if n["type"] != missing]}})


def test_ctr_run_keeps_its_private_namespaces_and_hostname():
    ns = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]
    s = _spec(copy.deepcopy(ns), hostname="box", pod=False)
    amend_for_guest(s, pod_member=False)
    assert s["linux"]["namespaces"] == ns and s["hostname"] == "box"


def test_malformed_namespaces_are_left_to_the_spec_checks():
    for s in ({"linux": {"namespaces": "x"}}, {"linux": None}, {}):
        before = copy.deepcopy(s)
        amend_for_guest(s, pod_member=True, sandbox_id="sbx")
        assert s == before
    s = {"linux": {"namespaces": [7, {"type": "pid"}]}}
    amend_for_guest(s, pod_member=True, sandbox_id="sbx")
    assert s["linux"]["namespaces"] == [{"type": "pid"}]


def test_dns_from_the_sandbox_resolv_conf_mount(tmp_path):
    # what containerd 1.6's CRI plugin writes from PodSandboxConfig.dns_config
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# generated\nsearch katapy.test svc.local\nnameserver 10.96.0.10\n\n"
                      "nameserver   10.96.0.11 # second\noptions ndots:2 timeout:1\nbogus line\n")
    spec = {"mounts": [{"destination": "/dev/shm", "type": "bind", "source": "/x/shm"},
                       {"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv),
                        "options": ["rbind", "ro"]}]}
    assert dns_from_spec(spec) == ["search katapy.test svc.local", "nameserver 10.96.0.10",
                                   "nameserver 10.96.0.11", "options ndots:2 timeout:1"]


def test_dns_without_a_usable_resolv_conf_mount(tmp_path):
    assert dns_from_spec({}) == []
    assert dns_from_spec({"mounts": [{"destination": "/etc/resolv.conf", "source": str(tmp_path / "gone")}]}) == []
    assert dns_from_spec({"mounts": [{"destination": "/etc/resolv.conf", "source": "relative"}]}) == []
    assert dns_from_spec({"mounts": [{"destination": "/etc/resolv.conf", "source": str(tmp_path)}]}) == []
    big = tmp_path / "big"
    big.write_bytes(b"nameserver 10.0.0.1\n" + b"#" * (1 << 20) + b"\nnameserver 10.0.0.2\n")
    assert dns_from_spec({"mounts": [{"destination": "/etc/resolv.conf", "source": str(big)}]}) == [
        "nameserver 10.0.0.1"]


def test_host_namespace_paths_mean_the_vms_own():
    """``ctr run --with-ns pid:/proc/1/ns/pid``-like specs: the host's namespace is the VM's."""
    s = _spec([{"type": "pid", "path": "/proc/self/ns/pid"}, {"type": "mount", "path": "/proc/self/ns/mnt"},
               {"type": "uts", "path": "/proc/self/ns/uts"}, {"type": "user", "path": "/nonexistent"}], pod=False)
    amend_for_guest(s, pod_member=False)
    assert s["linux"]["namespaces"] == [{"type": "user"}]


def test_pod_pid_namespace_follows_the_sandbox_container():
    """CRI names the sandbox's PID namespace by the task pid katapy reports (the VMM's, in the host's
    PID namespace) for hostPID and shareProcessNamespace pods alike; the sandbox spec decides."""
    app = [{"type": "pid", "path": "/proc/self/ns/pid"}, {"type": "mount"}]
    sandbox_pod = {"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}]}}
    sandbox_host_pid = {"linux": {"namespaces": [{"type": "ipc"}]}}
    assert has_namespace(sandbox_pod, "pid") and not has_namespace(sandbox_host_pid, "pid")
    assert not has_namespace({"linux": None}, "pid")

    s = _spec(copy.deepcopy(app))
    amend_for_guest(s, pod_member=True, sandbox_has_pid_ns=True, sandbox_id="sbx")
    # shareProcessNamespace: the sandbox container's (the pause process is its PID 1), never the agent's
    assert s["linux"]["namespaces"] == [{"type": "pid", "path": "container:sbx"}, {"type": "mount"}]
    s = _spec([{"type": "pid"}, {"type": "mount"}])
    amend_for_guest(s, pod_member=True, sandbox_has_pid_ns=True, sandbox_id="sbx")
    assert s["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}]  # its own (CONTAINER)
    s = _spec(copy.deepcopy(app))
    amend_for_guest(s, pod_member=True, sandbox_has_pid_ns=False, sandbox_id="sbx")
    assert s["linux"]["namespaces"] == [{"type": "mount"}]  # hostPID: the VM's
