"""The debug console (``debug_console = true``): a shell or a command in the VM from ``katapy exec``.

* ``katapy.protocol.debug_console`` - the framing both ends speak on guest
  vsock port 1027 (a protocol module, shared with the host);
* :mod:`.server` - the guest's end, started by the agent only when the
  kernel command line carries ``katapy.debug_console=1``.

The host's end is ``katapy.cli.exec``.
"""
