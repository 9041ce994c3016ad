"""Pod networking for sandbox VMs: the CNI-made netns carried into the guest with tc redirect.

    net = network.setup(netns_path)            # taps + filters in the pod netns
    fds = network.open_taps(net)               # one fd per tap, for the VMM
    ... hypervisor NetDevice(tap_name, guest_mac, tap_fd) per endpoint ...
    agent.update_interface(i) for i in network.guest.interfaces(net)
    agent.update_routes(network.guest.routes(net))
    network.teardown(net)
"""
from katapy.resource.network.netns import netns_path_from_spec, run_in_netns
from katapy.resource.network.pod import open_taps, setup, teardown
from katapy.resource.network.types import Endpoint, IpAddress, NetworkError, PodNetwork, RouteInfo, VethInfo

__all__ = [
    "Endpoint", "IpAddress", "NetworkError", "PodNetwork", "RouteInfo", "VethInfo",
    "netns_path_from_spec", "open_taps", "run_in_netns", "setup", "teardown",
]
