"""What the host and the guest agent say to each other, defined once for both ends.

* :mod:`.types` - plain values of the Kata agent API (Storage, Interface,
  IPAddress, Route) that ``katapy.agent`` and ``katapy.agent_client`` share;
  the protobuf messages themselves are ``katapy.pb``;
* :mod:`.portforward` - the request and status lines at the start of a
  port-forward stream (guest vsock port 1026);
* :mod:`.debug_console` - the debug console's framing (guest vsock port 1027).

Like ``katapy.upcall`` (the VMM's upcall wire format) this package is in the
guest image (katapy.osbuilder.image.AGENT_PACKAGES) and imports nothing but
the standard library, so the agent pays almost nothing for it under slow
emulation.  Import the modules explicitly; this package imports none of them.
"""
