"""The compiled cffi module (csrc/seccomp_trap); nothing outside ``katapy.vmm.seccomp`` imports this."""
from __future__ import annotations

try:
    from katapy.vmm._seccomp_trap import ffi, lib  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - a checkout without `make cffi`
    raise ImportError(
        "katapy.vmm._seccomp_trap is not built: run `make cffi` "
        f"(cd csrc/seccomp_trap && ../../.venv/bin/python build.py): {exc}"
    ) from exc

__all__ = ["ffi", "lib"]
