"""The qemu backend (external VMM): see ``backend.py``."""
from katapy.hypervisor.qemu.backend import QemuHypervisor, cleanup_state_dir

__all__ = ["QemuHypervisor", "cleanup_state_dir"]
