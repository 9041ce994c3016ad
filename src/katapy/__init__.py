"""katapy: a Python-native secure-container runtime (Kata Containers 4.0 design)."""

__version__ = "0.1.0"
