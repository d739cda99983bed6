"""Options: one name and one default across TOML, FASTWS_* and flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastws import config
from fastws.config import Config, ConfigError

REPO = Path(__file__).resolve().parent.parent


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "fastws.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_config_field_defaults() -> None:
    assert config.load(environ={}) == Config()
    assert {o.name: o.default for o in config.OPTIONS} == vars(Config())


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'port = 1111\npath = "/from-file"\nclose_timeout = 3\n')
    environ = {"FASTWS_PORT": "2222", "FASTWS_CONFIG": toml}
    resolved = config.load({"port": "3333"}, environ)
    assert resolved.port == 3333
    assert resolved.path == "/from-file"
    assert resolved.close_timeout == 3.0
    assert config.load({}, environ).port == 2222
    assert config.load({}, {}, toml).port == 1111


def test_every_option_has_a_matching_env_name_and_flag() -> None:
    for option in config.OPTIONS:
        assert option.env == "FASTWS_" + option.name.upper()
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.help


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown option 'prot'"),
        ('port = "eighty"\n', "port"),
        ("port = true\n", "port"),
        ("port = [1]\n", "port"),
        ("port = \n", "fastws.toml"),
    ],
)
def test_bad_files_are_refused_with_the_place_named(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load({}, {}, write_toml(tmp_path, text))


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FASTWS_MAX_MESSAGE_SIZE"):
        config.load({}, {"FASTWS_MAX_MESSAGE_SIZE": "big"})


def test_serve_exits_2_with_a_clear_message_on_a_bad_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastws", "serve", "--port", "not-a-port"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--port" in result.stderr


def test_docs_configuration_page_is_what_fastws_options_prints() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "fastws", "options"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert (REPO / "docs" / "configuration.md").read_text() == printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"compression_level": "12"}, "compression_level"),
        ({"port": "70000"}, "port"),
        ({"max_message_size": "0"}, "max_message_size"),
        ({"ping_timeout": "-1"}, "ping_timeout"),
        ({"rate_burst": "0"}, "rate_burst"),
    ],
)
def test_values_that_parse_but_cannot_work_are_refused_at_load(
    flags: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(flags, {})


def test_redis_cluster_is_one_option_and_excludes_redis(tmp_path: Path) -> None:
    seed = "redis://10.0.0.1:7000"
    assert config.load({"redis_cluster": seed}, {}).redis_cluster == seed
    assert config.load({}, {"FASTWS_REDIS_CLUSTER": seed}).redis_cluster == seed
    toml = write_toml(tmp_path, f'redis_cluster = "{seed}"\n')
    assert config.load({}, {}, toml).redis_cluster == seed
    # Two backplanes at once cannot work; say so rather than pick one.
    with pytest.raises(ConfigError, match="redis and redis_cluster are both set"):
        config.load({"redis": "redis://127.0.0.1:6379/0"}, {"FASTWS_REDIS_CLUSTER": seed})
    assert config.load({"workers": "2", "port": "8080", "redis_cluster": seed}, {}).workers == 2


def test_list_options_are_toml_arrays_or_comma_separated_text(tmp_path: Path) -> None:
    toml = write_toml(tmp_path, 'allowed_origins = ["https://a.example", "https://*.b.example"]\n')
    assert config.load({}, {}, toml).allowed_origins == ["https://a.example", "https://*.b.example"]
    environ = {"FASTWS_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7"}
    assert config.load({}, environ).trusted_proxies == ["10.0.0.0/8", "192.168.1.7"]
    flags = {"allowed_origins": "https://a.example,null"}
    assert config.load(flags, {}).allowed_origins == ["https://a.example", "null"]
    assert config.load({"trusted_proxies": ""}, {}).trusted_proxies == []
    with pytest.raises(ConfigError, match="allowed_origins"):
        config.load({}, {}, write_toml(tmp_path, "allowed_origins = [1]\n"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"allowed_origins": "https://app.example/"}, "an origin has no path"),
        ({"allowed_origins": "app.example"}, "starts with its scheme"),
        ({"trusted_proxies": "10.0.0.1/8"}, "trusted_proxies: '10.0.0.1/8'"),
        ({"trusted_proxies": "nginx"}, "trusted_proxies: 'nginx'"),
        ({"tls_cert": "cert.pem"}, "tls_cert and tls_key go together"),
        ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.pem"}, "cannot read"),
    ],
)
def test_edge_options_that_cannot_work_are_refused_at_load(
    flags: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(flags, {})
