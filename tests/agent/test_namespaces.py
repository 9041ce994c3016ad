"""katapy.agent.namespaces: joins of another container's namespaces, net.* sysctls of the VM's netns."""
from __future__ import annotations

import os

import pytest

from katapy.agent.namespaces import apply_vm_netns_sysctls, resolve_joins, sysctl_path
from katapy.ttrpc.errors import FailedPrecondition, InvalidArgument, NotFound


def _lookup(table):
    def init_pid_of(cid):
        if cid not in table:
            raise NotFound(f"container {cid!r} not found")
        return table[cid]
    return init_pid_of


def test_joins_become_proc_paths_of_the_named_containers_init():
    me = os.getpid()
    config = {"linux": {"namespaces": [{"type": "ipc", "path": "container:sbx"}, {"type": "pid", "path": "container:sbx"},
                                       {"type": "mount"}, {"type": "uts", "path": "/proc/1/ns/uts"}]}}
    resolve_joins(config, _lookup({"sbx": me}))
    assert config["linux"]["namespaces"] == [{"type": "ipc", "path": f"/proc/{me}/ns/ipc"},
                                             {"type": "pid", "path": f"/proc/{me}/ns/pid"},
                                             {"type": "mount"}, {"type": "uts", "path": "/proc/1/ns/uts"}]


def test_join_of_an_unknown_exited_or_vanished_container_or_bad_type_fails():
    spec = lambda kind="ipc": {"linux": {"namespaces": [{"type": kind, "path": "container:sbx"}]}}  # noqa: E731
    with pytest.raises(NotFound):
        resolve_joins(spec(), _lookup({}))
    with pytest.raises(FailedPrecondition, match="init has exited"):
        resolve_joins(spec(), _lookup({"sbx": None}))
    with pytest.raises(FailedPrecondition, match="is gone"):
        resolve_joins(spec(), _lookup({"sbx": 2 ** 22 + 12345}))  # above pid_max: never a live process
    with pytest.raises(InvalidArgument, match="type 'bogus'"):
        resolve_joins(spec("bogus"), _lookup({"sbx": os.getpid()}))


def test_net_sysctls_are_written_to_the_vms_netns_and_leave_the_spec(tmp_path):
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    port_range = tmp_path / "net" / "ipv4" / "ip_local_port_range"
    port_range.write_text("32768 60999\n")
    config = {"linux": {"sysctl": {"net.ipv4.ip_local_port_range": "20000 30000", "kernel.shm_rmid_forced": "1"},
                        "namespaces": [{"type": "ipc"}]}}
    assert apply_vm_netns_sysctls(config, str(tmp_path)) == {"net.ipv4.ip_local_port_range": "20000 30000"}
    assert port_range.read_text() == "20000 30000"
    assert config["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}  # crun applies it in the new IPC ns


def test_net_sysctls_of_a_container_with_its_own_netns_are_crun_s(tmp_path):
    config = {"linux": {"sysctl": {"net.ipv4.ip_forward": "1"}, "namespaces": [{"type": "network"}]}}
    assert apply_vm_netns_sysctls(config, str(tmp_path)) == {}
    assert config["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}


@pytest.mark.parametrize("key,value,error", [
    ("net.ipv4.no_such_key", "1", "no such key in the guest kernel"),
    ("net.ipv4/../../etc", "1", "invalid sysctl key"),
    ("net..x", "1", "invalid sysctl key"),
    ("net.ipv4.x", "1\n2", "invalid value"),
])
def test_bad_net_sysctls_are_refused(tmp_path, key, value, error):
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    with pytest.raises(InvalidArgument, match=error):
        apply_vm_netns_sysctls({"linux": {"sysctl": {key: value}}}, str(tmp_path))


def test_sysctl_paths_accept_dots_or_slashes():
    assert sysctl_path("net.ipv4.conf.all.forwarding") == "/proc/sys/net/ipv4/conf/all/forwarding"
    assert sysctl_path("net/ipv4/conf/eth0.1/forwarding") == "/proc/sys/net/ipv4/conf/eth0.1/forwarding"
