"""Thin helpers over Linux interfaces that more than one layer needs (no katapy imports, no policy).

* :mod:`.tuntap` - ``/dev/net/tun``: attach a queue fd to an existing tap
  (include/uapi/linux/if_tun.h), for the pod network (``katapy.resource.network``)
  and the built-in VMM's virtio-net back end (``katapy.vmm.virtio.net.tap``);
* :mod:`.fds` - this process's descriptors against its RLIMIT_NOFILE, the
  note an error gets when that is why it failed.

Import the modules explicitly; this package imports nothing.
"""
