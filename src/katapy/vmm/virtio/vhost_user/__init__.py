"""vhost-user back-end server for katapy's virtio devices."""
from katapy.vmm.virtio.vhost_user.server import VhostUserServer

__all__ = ["VhostUserServer"]
