from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.config import (
    AgentConfig,
    KerberosConfig,
    LogConfig,
    StatusConfig,
    TunnelConfig,
    UpstreamConfig,
    config_from_dict,
    load_config,
    save_config,
)
from backhaul.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "agent.toml"

MINIMAL = """
relay_url = "https://relay.example.com/"
member_id = "mbr_1"
gateway_id = "gw_1"
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "agent.toml").write_text(text)
    return tmp_path


def test_minimal_config_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), environ={})
    assert cfg.relay_url == "https://relay.example.com"
    assert cfg.tunnel_url == "wss://relay.example.com/v1/tunnel"
    assert cfg.signing_key_file == tmp_path / "keys" / "member.key"
    assert cfg.gateway_key_file == tmp_path / "keys" / "gateway.key"
    assert cfg.status.socket == tmp_path / "run" / "status.sock"
    assert cfg.status.listen_address is None
    assert cfg.tunnel.ping_interval_seconds == 15
    assert cfg.tunnel.ping_timeout_seconds == 30
    assert cfg.tunnel.backoff_initial_seconds == 0.5
    assert cfg.tunnel.backoff_max_seconds == 30
    assert cfg.tunnel.max_concurrent_streams == 256
    assert cfg.tunnel.shutdown_grace_seconds == 30
    assert cfg.upstream.connect_timeout_seconds == 10
    assert cfg.upstream.default_timeout_seconds == 30
    assert cfg.upstream.max_connections == 100
    assert cfg.upstream.verify is True
    assert cfg.upstream.ca_file is None
    assert cfg.log.format == "auto"
    assert cfg.log.level == "info"
    assert cfg.allow == []
    assert cfg.dev is False
    assert cfg.name


def test_relay_path_prefix_kept_in_tunnel_url(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {"relay_url": "https://relay.example.com/backhaul/", "member_id": "m", "gateway_id": "g"},
        tmp_path,
    )
    assert cfg.tunnel_url == "wss://relay.example.com/backhaul/v1/tunnel"


def test_env_overrides_nested_and_json(tmp_path: Path) -> None:
    env = {
        "BACKHAUL_AGENT_STATUS__LISTEN": "127.0.0.1:9464",
        "BACKHAUL_AGENT_TUNNEL__MAX_CONCURRENT_STREAMS": "64",
        "BACKHAUL_AGENT_LOG__LEVEL": "DEBUG",
        "BACKHAUL_AGENT_UPSTREAM__VERIFY": "false",
        "BACKHAUL_AGENT_ALLOW": '[{"prefix": "https://api.internal/v1/"}]',
        "OTHER": "ignored",
    }
    cfg = load_config(write(tmp_path, MINIMAL), environ=env)
    assert cfg.status.listen_address == ("127.0.0.1", 9464)
    assert cfg.tunnel.max_concurrent_streams == 64
    assert cfg.log.level == "debug"
    assert cfg.upstream.verify is False
    assert cfg.allow[0].prefix == "https://api.internal:443/v1/"


def test_process_environment_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKHAUL_AGENT_NAME", "from-env")
    assert load_config(write(tmp_path, MINIMAL)).name == "from-env"


@pytest.mark.parametrize(
    ("extra", "env", "key"),
    [
        ("[tunnel]\nping_interval_seconds = -1\n", {}, "tunnel.ping_interval_seconds"),
        ("[tunnel]\nbackoff_max_seconds = 0.1\n", {}, "tunnel.backoff_max_seconds"),
        ("[tunnel]\nping_intervl_seconds = 1\n", {}, "tunnel.ping_intervl_seconds"),
        ("[tunnel]\nlocal_address = 'eth0'\n", {}, "tunnel.local_address"),
        ("[upstream]\nverify = 'maybe'\n", {}, "upstream.verify"),
        ("[status]\nlisten = 'localhost'\n", {}, "status.listen"),
        ("[log]\nformat = 'xml'\n", {}, "log.format"),
        ("[[allow]]\nprefix = 'ftp://x/'\n", {}, "allow[0].prefix"),
        ("[[allow]]\nhost = 'a'\ncidr = '10.0.0.0/8'\n", {}, "allow[0]"),
        ("pinned_fingerprint = 'md5:00'\n", {}, "pinned_fingerprint"),
        (
            "",
            {"BACKHAUL_AGENT_TUNNEL__PING_TIMEOUT_SECONDS": "soon"},
            "tunnel.ping_timeout_seconds",
        ),
        ("", {"BACKHAUL_AGENT_UNKNOWN": "1"}, "unknown"),
        ("", {"BACKHAUL_AGENT_RELAY_URL": "http://relay.example.com"}, "relay_url"),
        ("", {"BACKHAUL_AGENT_RELAY_URL": "relay.example.com"}, "relay_url"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, extra: str, env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + extra), environ=env)
    message = str(info.value)
    assert f"{key}:" in message
    if env:
        assert next(iter(env)) in message


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="member_id: required key is missing"):
        load_config(write(tmp_path, 'relay_url = "https://r"\ngateway_id = "g"\n'), environ={})


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="enroll first"):
        load_config(tmp_path, environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "relay_url = "), environ={})


def test_env_json_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BACKHAUL_AGENT_ALLOW: not valid JSON"):
        load_config(write(tmp_path, MINIMAL), environ={"BACKHAUL_AGENT_ALLOW": "[{"})


def test_config_dir_is_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config_dir"):
        load_config(write(tmp_path, MINIMAL + 'config_dir = "/"\n'), environ={})


def test_dev_allows_http_only_on_loopback(tmp_path: Path) -> None:
    base = {"member_id": "m", "gateway_id": "g", "dev": True}
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        cfg = config_from_dict({**base, "relay_url": url}, tmp_path)
        assert cfg.tunnel_url.startswith("ws://")
    with pytest.raises(ConfigError, match="relay_url"):
        config_from_dict({**base, "relay_url": "http://relay.example.com"}, tmp_path)
    with pytest.raises(ConfigError, match="relay_url"):
        config_from_dict({**base, "dev": False, "relay_url": "http://127.0.0.1:8000"}, tmp_path)


def test_absolute_paths_kept(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, MINIMAL + 'signing_key_file = "/etc/bh/member.key"\n'), environ={}
    )
    assert cfg.signing_key_file == Path("/etc/bh/member.key")


def test_save_round_trip_is_short_relative_and_private(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            "relay_url": "https://relay.example.com",
            "member_id": "mbr_1",
            "gateway_id": "gw_1",
            "name": "n1",
            "pinned_fingerprint": "sha256:" + "ab" * 32,
            "tunnel": {"max_concurrent_streams": 8},
            "allow": [
                {"prefix": "https://api.internal/v1/"},
                {"cidr": "10.0.0.0/8", "ports": [80]},
            ],
        },
        tmp_path,
    )
    path = tmp_path / "agent.toml"
    save_config(path, cfg)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    doc = tomllib.loads(path.read_text())
    assert doc["tunnel"] == {"max_concurrent_streams": 8}
    assert "upstream" not in doc and "status" not in doc
    assert "signing_key_file" not in doc  # default, relative to the dir
    again = load_config(tmp_path, environ={})
    assert again.model_dump() == cfg.model_dump()


def _keys(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields) - {"config_dir"}


def test_example_config_is_valid_and_documents_every_key(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    cfg = load_config(write(tmp_path, text), environ={})
    assert len(cfg.allow) == 3
    for key in _keys(AgentConfig):
        assert f"{key} =" in text or f"[{key}]" in text or f"[[{key}]]" in text, key
    for section in (TunnelConfig, UpstreamConfig, StatusConfig, LogConfig, KerberosConfig):
        for key in _keys(section):
            assert f"{key} =" in text, key
    defaults = AgentConfig.model_validate(
        {
            "relay_url": "https://r.example",
            "member_id": "m",
            "gateway_id": "g",
            "config_dir": tmp_path,
        }
    )
    # The example's uncommented values are the defaults, so it doubles as their documentation.
    assert cfg.tunnel == defaults.tunnel
    assert cfg.upstream == defaults.upstream
    assert cfg.status == defaults.status
    assert cfg.log == defaults.log
