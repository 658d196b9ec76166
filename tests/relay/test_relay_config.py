"""Configuration layering and key-naming errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from backhaul.errors import ConfigError
from relay.config import load_config


def test_defaults_in_dev(tmp_path: Path) -> None:
    config = load_config(None, {"dev": True, "data_dir": tmp_path}, environ={})
    assert (config.host, config.port) == ("127.0.0.1", 8443)
    assert config.database_url == f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    assert config.enrollment_ttl_seconds == 3600
    assert config.invoke_timeout_seconds == 30 and config.invoke_timeout_max_seconds == 300
    assert config.max_request_header_bytes == 32768 and config.max_body_bytes == 0
    assert config.log_format == "auto"


def test_layers_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        'dev = true\nlisten = "0.0.0.0:9000"\nping_interval_seconds = 5\nlog_level = "debug"\n'
    )
    env = {"BACKHAUL_RELAY_LISTEN": "[::1]:9100", "BACKHAUL_RELAY_MAX_BODY_BYTES": "1024"}
    config = load_config(path, {"data_dir": tmp_path, "listen": None}, environ=env)
    assert (config.host, config.port) == ("::1", 9100)
    assert config.ping_interval_seconds == 5 and config.max_body_bytes == 1024
    config = load_config(path, {"data_dir": tmp_path, "listen": "127.0.0.1:1"}, environ=env)
    assert config.port == 1


def test_relay_table_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[relay]\ndev = true\n")
    assert load_config(path, {"data_dir": tmp_path}, environ={}).dev is True


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"BACKHAUL_RELAY_LISTEN": "nowhere"}, "listen"),
        ({"BACKHAUL_RELAY_ENROLLMENT_TTL_SECONDS": "-1"}, "enrollment_ttl_seconds"),
        ({"BACKHAUL_RELAY_LOG_FORMAT": "xml"}, "log_format"),
        ({"BACKHAUL_RELAY_DEV": "maybe"}, "dev"),
    ],
)
def test_errors_name_the_key_and_source(tmp_path: Path, env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"data_dir": tmp_path}, environ={"BACKHAUL_RELAY_DEV": "1", **env})
    assert key in str(info.value)
    assert "BACKHAUL_RELAY_" in str(info.value)


def test_tls_required_unless_dev(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert"):
        load_config(None, {"data_dir": tmp_path}, environ={})
    config = load_config(
        None,
        {"data_dir": tmp_path, "tls_cert": tmp_path / "c", "tls_key": tmp_path / "k"},
        environ={},
    )
    assert config.dev is False


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("dev = true\nlisen = '1.2.3.4:5'\n")
    with pytest.raises(ConfigError, match="lisen"):
        load_config(path, {"data_dir": tmp_path}, environ={})


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("dev = = true\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, {}, environ={})


def test_example_file_documents_every_key_and_loads() -> None:
    from relay.config import RelayConfig

    example = Path(__file__).resolve().parents[2] / "config" / "relay.toml"
    text = example.read_text()
    for key in RelayConfig.model_fields:
        assert f"\n{key} = " in text or f"\n# {key} = " in text, key
    config = load_config(example, {"dev": True, "data_dir": Path("/nonexistent")}, environ={})
    assert config == load_config(None, {"dev": True, "data_dir": Path("/nonexistent")}, environ={})


def test_workers_default_to_one_process(tmp_path: Path) -> None:
    config = load_config(None, {"dev": True, "data_dir": tmp_path}, environ={})
    assert config.workers == 1 and config.worker_count == 1


def test_workers_need_redis(tmp_path: Path) -> None:
    for workers in ("2", "0"):
        env = {"BACKHAUL_RELAY_WORKERS": workers}
        with pytest.raises(ConfigError, match="workers > 1 needs redis_url"):
            load_config(None, {"dev": True, "data_dir": tmp_path}, environ=env)
    config = load_config(
        None,
        {"dev": True, "data_dir": tmp_path, "workers": 3, "redis_url": "redis://127.0.0.1/0"},
        environ={},
    )
    assert config.workers == 3 and config.worker_count == 3


def test_workers_zero_is_one_per_usable_cpu(tmp_path: Path) -> None:
    import os

    path = tmp_path / "relay.toml"
    path.write_text('dev = true\nworkers = 0\nredis_url = "redis://127.0.0.1:6379/0"\n')
    config = load_config(path, {"data_dir": tmp_path}, environ={})
    assert config.workers == 0
    assert config.worker_count == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_bad_workers_name_the_key(tmp_path: Path, value: str) -> None:
    env = {"BACKHAUL_RELAY_WORKERS": value, "BACKHAUL_RELAY_REDIS_URL": "redis://r/0"}
    with pytest.raises(ConfigError, match=r"workers \(from BACKHAUL_RELAY_WORKERS\)"):
        load_config(None, {"dev": True, "data_dir": tmp_path}, environ=env)


def test_workers_advertise_their_own_addresses(tmp_path: Path) -> None:
    flags = {
        "dev": True,
        "data_dir": tmp_path,
        "workers": 2,
        "redis_url": "redis://127.0.0.1:6379/0",
        "advertise_url": "https://10.0.3.17:8443",
    }
    with pytest.raises(ConfigError, match="advertise_url cannot be set with workers > 1"):
        load_config(None, flags, environ={})


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("127.0.0.53:8080", "http://127.0.0.53:8080"),
        ("[::1]:8080", "http://[::1]:8080"),
        ("localhost:8080", "http://localhost:8080"),
    ],
)
def test_the_local_listener_is_on_loopback(tmp_path: Path, value: str, url: str) -> None:
    config = load_config(None, {"dev": True, "data_dir": tmp_path, "local_listen": value}, {})
    assert config.local_listen == value and config.local_url == url
    assert load_config(None, {"dev": True, "data_dir": tmp_path}, {}).local_url is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0.0.0.0:8080", "not a loopback address"),
        ("10.0.3.17:8080", "not a loopback address"),
        ("[::]:8080", "not a loopback address"),
        ("relay.example.com:8080", "not an IP address"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:8443", "local_listen must differ from listen"),
    ],
)
def test_the_local_listener_refuses_other_addresses(
    tmp_path: Path, value: str, reason: str
) -> None:
    env = {"BACKHAUL_RELAY_LOCAL_LISTEN": value}
    with pytest.raises(ConfigError, match=reason) as caught:
        load_config(None, {"dev": True, "data_dir": tmp_path}, environ=env)
    if "differ" not in reason:
        assert "local_listen (from BACKHAUL_RELAY_LOCAL_LISTEN)" in str(caught.value)
