"""katapy.config: loading, precedence, and one clear error per bad value."""
from __future__ import annotations

from pathlib import Path

import pytest

from katapy import config
from katapy.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def boot_files(tmp_path: Path) -> dict[str, Path]:
    k, i = tmp_path / "vmlinux", tmp_path / "initrd.img"
    k.write_bytes(b"k")
    i.write_bytes(b"i")
    return {"kernel": k, "initrd": i}


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "configuration.toml"
    p.write_text(text)
    return p


def _files(boot: dict[str, Path]) -> str:
    return f'kernel = "{boot["kernel"]}"\ninitrd = "{boot["initrd"]}"\n'


def test_full_file_loads(tmp_path: Path, boot_files: dict[str, Path]) -> None:
    p = _write(tmp_path, f"""
[hypervisor]
name = "qemu"
path = "/usr/bin/qemu-system-x86_64"
{_files(boot_files)}
kernel_params = "loglevel=3"
default_vcpus = 2
default_memory = 512
max_vcpus = 4
max_memory = 1024
shared_fs = "virtio-fs"
debug_console = true
[agent]
port = 2048
log_port = 2049
dial_timeout = 5
[runtime]
log_level = "debug"
state_dir = "/run/katapy-test"
""")
    cfg = config.load(p, check_files=False)
    assert cfg.source == p
    assert cfg.hypervisor.name == "qemu" and cfg.hypervisor.default_vcpus == 2 and cfg.hypervisor.debug_console
    assert cfg.hypervisor.kernel == boot_files["kernel"]
    assert cfg.agent.port == 2048 and cfg.agent.dial_timeout == 5.0 and isinstance(cfg.agent.dial_timeout, float)
    assert cfg.runtime.state_dir == Path("/run/katapy-test")
    # the TOML that `config show` prints reads back to the same configuration
    again = config.from_dict(__import__("tomllib").loads(config.to_toml(cfg)), source=p, check_files=False)
    assert again == cfg


def test_relative_paths_are_relative_to_the_file(tmp_path: Path, boot_files: dict[str, Path]) -> None:
    p = _write(tmp_path, '[hypervisor]\nkernel = "vmlinux"\ninitrd = "initrd.img"\n')
    cfg = config.load(p)
    assert cfg.hypervisor.kernel == tmp_path / "vmlinux"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[hypervisr]\nname = 'qemu'\n", r"unknown section \[hypervisr\]"),
        ("[hypervisor]\nnmae = 'qemu'\n", r"unknown key \[hypervisor\] nmae = 'qemu'"),
        ("[agent]\nport = '1024'\n", r"\[agent\] port = '1024': expected an integer"),
        ("[agent]\nport = true\n", r"\[agent\] port = True: expected an integer"),
        ("[hypervisor]\ndebug_console = 1\n", r"\[hypervisor\] debug_console = 1: expected true or false"),
        ("[hypervisor]\nname = 'firecracker'\n", r"\[hypervisor\] name = 'firecracker': must be one of auto, builtin, qemu"),
        ("[hypervisor]\ndefault_vcpus = 4\nmax_vcpus = 2\n", r"\[hypervisor\] default_vcpus = 4: greater than max_vcpus = 2"),
        ("[hypervisor]\ndefault_vcpus = 0\n", r"\[hypervisor\] default_vcpus = 0: must be at least 1"),
        ("[hypervisor]\ndefault_memory = 32\n", r"\[hypervisor\] default_memory = 32: must be at least 64"),
        ("[hypervisor]\ndefault_memory = 4096\nmax_memory = 2048\n", r"default_memory = 4096: greater than max_memory = 2048"),
        ("[hypervisor]\nshared_fs = '9p'\n", r"\[hypervisor\] shared_fs = '9p': must be one of virtio-fs, none"),
        ("[hypervisor]\nkernel_params = \"a\\nb\"\n", r"kernel_params = 'a\\nb': must be one line"),
        ("[agent]\nport = 0\n", r"\[agent\] port = 0: must be a vsock port"),
        ("[agent]\nlog_port = 1024\n", r"\[agent\] log_port = 1024: must differ from port"),
        ("[agent]\ndial_timeout = -1\n", r"\[agent\] dial_timeout = -1.0: must be a positive number"),
        ("[runtime]\nlog_level = 'loud'\n", r"\[runtime\] log_level = 'loud': must be one of debug"),
        ("[runtime]\nstate_dir = ''\n", r"\[runtime\] state_dir = '': expected a path string"),
        ("hypervisor = 3\n", r"hypervisor = 3: expected a \[hypervisor\] table"),
        ("[hypervisor\n", r"not valid TOML"),
    ],
)
def test_bad_values_name_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        config.load(p, check_files=False)
    assert str(p) in str(info.value)


def test_missing_kernel_and_initrd_are_errors(tmp_path: Path, boot_files: dict[str, Path]) -> None:
    p = _write(tmp_path, f'[hypervisor]\nkernel = "{tmp_path}/nope"\ninitrd = "{boot_files["initrd"]}"\n')
    with pytest.raises(ConfigError, match=rf"\[hypervisor\] kernel = '{tmp_path}/nope': no such file"):
        config.load(p)
    p = _write(tmp_path, f'[hypervisor]\nkernel = "{boot_files["kernel"]}"\ninitrd = "{tmp_path}/gone.img"\n')
    with pytest.raises(ConfigError, match=r"initrd = '.*/gone.img': no such file"):
        config.load(p)
    assert config.load(p, check_files=False).hypervisor.initrd == tmp_path / "gone.img"


def test_qemu_binary_must_be_executable(tmp_path: Path, boot_files: dict[str, Path]) -> None:
    p = _write(tmp_path, f'[hypervisor]\nname = "qemu"\npath = "{tmp_path}/qemu"\n{_files(boot_files)}')
    with pytest.raises(ConfigError, match=rf"\[hypervisor\] path = '{tmp_path}/qemu': not an executable"):
        config.load(p)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        config.load(tmp_path / "absent.toml")


def test_precedence_env_then_config_dir_then_defaults(
    tmp_path: Path, boot_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KATAPY_CONFIG", raising=False)
    monkeypatch.setenv("KATAPY_CONFIG_DIR", str(tmp_path / "etc"))
    assert config.find() is None
    assert config.load(check_files=False).source is None  # built-in defaults
    (tmp_path / "etc").mkdir()
    in_dir = tmp_path / "etc" / "configuration.toml"
    in_dir.write_text("[hypervisor]\ndefault_vcpus = 1\n")
    assert config.load(check_files=False).source == in_dir
    env = tmp_path / "env.toml"
    env.write_text("[runtime]\nlog_level = 'debug'\n")
    monkeypatch.setenv("KATAPY_CONFIG", str(env))
    cfg = config.load(check_files=False)
    assert cfg.source == env and cfg.runtime.log_level == "debug"


@pytest.mark.parametrize("name", ["builtin", "qemu"])
def test_shipped_files_are_valid(name: str) -> None:
    cfg = config.load(REPO / "configs" / f"configuration-{name}.toml", check_files=False)
    assert cfg.hypervisor.name == name
    assert config.HypervisorConfig().kernel == cfg.hypervisor.kernel  # default artifact paths, not hard-coded


def test_to_toml_escapes_control_characters(tmp_path: Path) -> None:
    """Found by fuzz/targets/oci_config.py: a kernel_params holding a form feed (legal in TOML as
    ``\\f``) was printed raw by to_toml, which tomllib then refused."""
    import tomllib

    p = _write(tmp_path, '[hypervisor]\nkernel_params = "a\\fb\\u0001c\\u007f\\\\ \\"q\\" \\t"\n')
    cfg = config.load(p, check_files=False)
    assert cfg.hypervisor.kernel_params == 'a\fb\x01c\x7f\\ "q" \t'
    again = config.from_dict(tomllib.loads(config.to_toml(cfg)), source=p, check_files=False)
    assert again == cfg
