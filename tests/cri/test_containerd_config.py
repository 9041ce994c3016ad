"""scripts/containerd-config.py: merging the katapy stanza into containerd configs."""
from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("containerd_config", REPO / "scripts" / "containerd-config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cc = _load()

EXISTING_V2 = """version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.6"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
"""


def _runtimes(doc, plugin="io.containerd.grpc.v1.cri"):
    return doc["plugins"][plugin]["containerd"]["runtimes"]


def test_merge_keeps_everything_and_backs_up(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(EXISTING_V2)
    assert cc.main(["--config", str(cfg), "--katapy-config", "/etc/katapy/configuration-qemu.toml"]) == 0
    doc = tomllib.loads(cfg.read_text())
    runtimes = _runtimes(doc)
    assert runtimes["runc"]["options"]["SystemdCgroup"] is True
    assert doc["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"] == "registry.k8s.io/pause:3.6"
    k = runtimes["katapy"]
    assert k["runtime_type"] == "io.containerd.katapy.v2"
    assert k["pod_annotations"] == ["io.katapy.*"]
    assert k["privileged_without_host_devices"] is True
    assert k["options"]["ConfigPath"] == "/etc/katapy/configuration-qemu.toml"
    backups = list(tmp_path.glob("config.toml.katapy-backup-*"))
    assert len(backups) == 1 and backups[0].read_text() == EXISTING_V2


def test_merge_is_idempotent(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text(EXISTING_V2)
    assert cc.main(["--config", str(cfg)]) == 0
    once = cfg.read_text()
    assert cc.main(["--config", str(cfg)]) == 0
    assert cfg.read_text() == once
    assert once.count("runtimes.katapy]") == 1
    assert len(list(tmp_path.glob("config.toml.katapy-backup-*"))) == 1
    assert "already configured (unchanged)" in capsys.readouterr().out


def test_other_katapy_settings_are_left_alone(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text(EXISTING_V2 + '\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.katapy]\n'
                   '  runtime_type = "io.containerd.katapy.v2"\n')
    before = cfg.read_text()
    assert cc.main(["--config", str(cfg)]) == 0
    assert cfg.read_text() == before
    assert "other settings; left unchanged" in capsys.readouterr().out


def test_version1_config_gets_v1_plugin_names(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[plugins.cri]\n  sandbox_image = "pause"\n')
    assert cc.main(["--config", str(cfg)]) == 0
    doc = tomllib.loads(cfg.read_text())
    assert _runtimes(doc, "cri")["katapy"]["runtime_type"] == "io.containerd.katapy.v2"
    assert "io.containerd.grpc.v1.cri" not in doc["plugins"]


def test_missing_file_is_created(tmp_path, capsys):
    cfg = tmp_path / "etc" / "config.toml"
    assert cc.main(["--config", str(cfg)]) == 0
    doc = tomllib.loads(cfg.read_text())
    assert doc["version"] == 2 and "katapy" in _runtimes(doc)
    assert "systemctl restart containerd" in capsys.readouterr().out


@pytest.mark.parametrize("text,message", [
    ("version = 2\n[plugins\n", "not valid TOML"),
    ("version = 3\n", "version 3 is not supported"),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  runtimes = 5\n', "would break the file"),
])
def test_errors_write_nothing(tmp_path, capsys, text, message):
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    assert cc.main(["--config", str(cfg)]) == 1
    assert message in capsys.readouterr().err
    assert cfg.read_text() == text
    assert not list(tmp_path.glob("*.katapy-*"))
