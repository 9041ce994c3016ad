"""The builtin backend: katapy's own VMM in the shim process (Dragonball's place in Kata 4.0)."""
from katapy.hypervisor.builtin.backend import BuiltinHypervisor

__all__ = ["BuiltinHypervisor"]
