"""The guest side of the upcall channel: katapy's agent serves dbs-upcall's device manager on a stock kernel.

``server.UpcallServer`` accepts the VMM's connection on vsock port 0xDB and
answers each request (docs/protocols.md §8); ``memory`` and ``cpu`` act
through sysfs.  Virtio-mmio requests are answered ENOTSUP until device
hotplug lands.
"""
