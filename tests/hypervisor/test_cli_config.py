"""`katapy config use/show/list` on a private config directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from katapy import config
from katapy.cli import config as cli_config
from katapy.hypervisor.selection import decide

REPO = Path(__file__).resolve().parents[2]


def _katapy(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "katapy.cli", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])), **env},
    )


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("KATAPY_CONFIG_DIR", str(tmp_path / "etc"))
    monkeypatch.delenv("KATAPY_CONFIG", raising=False)
    return {"KATAPY_CONFIG_DIR": str(tmp_path / "etc")}


def test_use_switches_the_link(tmp_path: Path, env: dict[str, str]) -> None:
    etc = tmp_path / "etc"
    r = _katapy("config", "use", "qemu", env=env)
    assert r.returncode == 0, r.stderr
    link = etc / "configuration.toml"
    assert link.is_symlink() and os.readlink(link) == "configuration-qemu.toml"
    assert config.load(check_files=False).hypervisor.name == "qemu"
    r = _katapy("config", "use", "builtin", env=env)
    assert r.returncode == 0, r.stderr
    assert os.readlink(link) == "configuration-builtin.toml"
    assert config.load(check_files=False).hypervisor.name == "builtin"
    r = _katapy("config", "list", env=env)
    assert r.stdout.splitlines() == [f"* {etc}/configuration-builtin.toml", f"  {etc}/configuration-qemu.toml"]


def test_use_auto_picks_this_hosts_backend(tmp_path: Path, env: dict[str, str]) -> None:
    target = cli_config.use("auto")
    assert target.name == f"configuration-{decide('auto').name}.toml"


def test_use_refuses_unknown_names_and_hand_edited_files(tmp_path: Path, env: dict[str, str]) -> None:
    r = _katapy("config", "use", "firecracker", env=env)
    assert r.returncode == 1 and "no configuration named 'firecracker'" in r.stderr
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "configuration.toml").write_text("[hypervisor]\nname = 'qemu'\n")
    r = _katapy("config", "use", "builtin", env=env)
    assert r.returncode == 1 and "regular file" in r.stderr
    assert not (etc / "configuration.toml").is_symlink()
    r = _katapy("config", "use", "builtin", "--force", env=env)
    assert r.returncode == 0, r.stderr
    assert (etc / "configuration.toml.bak").read_text() == "[hypervisor]\nname = 'qemu'\n"
    # a broken per-hypervisor file is never switched to
    (etc / "configuration-qemu.toml").write_text("[hypervisor]\nname = 'nope'\n")
    r = _katapy("config", "use", "qemu", env=env)
    assert r.returncode == 1 and "name = 'nope'" in r.stderr
    assert os.readlink(etc / "configuration.toml") == "configuration-builtin.toml"


def test_show_prints_effective_toml_that_reloads(tmp_path: Path, env: dict[str, str]) -> None:
    cli_config.use("qemu")
    r = _katapy("config", "show", env=env)
    assert r.returncode == 0, r.stderr
    assert f"# source: {tmp_path}/etc/configuration.toml" in r.stdout
    assert "# hypervisor on this host: qemu" in r.stdout
    shown = tmp_path / "shown.toml"
    shown.write_text(r.stdout)
    assert config.load(shown, check_files=False).hypervisor == config.load(check_files=False).hypervisor
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nport = -1\n")
    r = _katapy("config", "show", "--config", str(bad), env=env)
    assert r.returncode == 1 and "[agent] port = -1" in r.stderr
