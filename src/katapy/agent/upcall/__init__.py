"""The guest's end of the upcall channel: the VMM asks the agent to take hot-plugged resources into use.

Protocol: Kata's dbs-upcall device manager (``katapy.upcall.wire``;
docs/protocols.md §8).  The VMM dials guest vsock port 0xDB, writes the
service byte ``d``, reads a CONNECT greeting, then sends one 0x400-byte
request at a time; each gets one 0x400-byte reply with ``ret`` 0 or a
negative errno.

On a stock kernel the guest acts through sysfs, not through Dragonball's
kernel patches:

* :mod:`.memory` - ADD_MEM / DEL_MEM: probe and online / offline memory blocks;
* :mod:`.mmio` - ADD_MMIO / DEL_MMIO: bind / unbind placeholder virtio-mmio devices;
* :mod:`.cpu` - ADD_CPU / DEL_CPU: online / offline vCPUs;
* :mod:`.server` - :class:`~.server.UpcallServer`, the accept loop and framing;
* :mod:`.handlers` - :class:`~.handlers.DeviceManager`, requests to the modules above.

The agent imports only :mod:`.server` at start-up (socket and threading);
everything else, the wire format included, is imported when the VMM first
connects: importing costs seconds of boot time under TCG.
"""
