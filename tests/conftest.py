"""Suite-wide pytest set-up: the `kvm` marker's runner (see katapy.testing.pytest_kvm) and a hermetic configuration.

A machine where katapy is installed (``make demo`` runs scripts/install.sh) has
/etc/katapy/configuration.toml, a link to the qemu or builtin file with its own
``state_dir``.  The shims the tests start would read it (katapy.config's search
order) and run on whatever backend it names, with state outside the test's
KATAPY_STATE.  The suite points KATAPY_CONFIG_DIR at an empty directory of its
own, so every shim starts from the defaults (``hypervisor = "auto"``) unless a
test hands it a file through KATAPY_CONFIG or ``--config``.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytest_plugins = ["katapy.testing.pytest_kvm"]

_CONFIG_DIR: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    if "KATAPY_CONFIG_DIR" in os.environ:
        return
    os.environ.pop("KATAPY_CONFIG", None)
    d = tempfile.mkdtemp(prefix="katapy-test-etc-")
    os.environ["KATAPY_CONFIG_DIR"] = d
    _CONFIG_DIR.append(d)


def pytest_unconfigure(config: pytest.Config) -> None:
    for d in _CONFIG_DIR:
        shutil.rmtree(d, ignore_errors=True)
        if os.environ.get("KATAPY_CONFIG_DIR") == d:
            del os.environ["KATAPY_CONFIG_DIR"]
    _CONFIG_DIR.clear()
