"""virtio-net back end (virtio 1.2, section 5.1) for the built-in VMM: one queue pair over a host tap."""
from katapy.vmm.virtio.net.device import NetDevice, parse_mac
from katapy.vmm.virtio.net.tap import Tap, TapError

__all__ = ["NetDevice", "Tap", "TapError", "parse_mac"]
