"""Private key files: written 0600, and ``backhaul-agent run`` refuses to start — with a
clear error and a non-zero exit — when group or others can read one of them."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import tomli_w

from backhaul.devstack import command
from backhaul.keys import b64e, generate_signing_key, save_signing_key, write_private
from backhaul.seal import GatewayKeyPair

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def _config(tmp_path: Path) -> Path:
    config_dir = tmp_path / "agent"
    save_signing_key(config_dir / "keys" / "member.key", generate_signing_key())
    gateway = GatewayKeyPair.generate()
    write_private(config_dir / "keys" / "gateway.key", b64e(gateway.to_bytes()).encode())
    doc = {
        "relay_url": "https://127.0.0.1:9",  # never reached: the keys are checked first
        "member_id": "mem_keys",
        "gateway_id": "gw_keys",
        "allow": [{"prefix": "http://127.0.0.1:9/"}],
    }
    (config_dir / "agent.toml").write_text(tomli_w.dumps(doc))
    return config_dir


def test_key_files_are_written_0600(tmp_path: Path) -> None:
    config_dir = _config(tmp_path)
    for name in ("member.key", "gateway.key"):
        assert stat.S_IMODE((config_dir / "keys" / name).stat().st_mode) == 0o600, name


@pytest.mark.parametrize(("name", "mode"), [("member.key", 0o644), ("gateway.key", 0o640)])
def test_agent_refuses_to_start_with_a_readable_key(tmp_path: Path, name: str, mode: int) -> None:
    config_dir = _config(tmp_path)
    key = config_dir / "keys" / name
    key.chmod(mode)
    done = subprocess.run(
        [command("backhaul-agent"), "run", "--config-dir", str(config_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "BACKHAUL_AGENT_LOG__FORMAT": "json"},
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "accessible by group or others" in output, output
    assert f"chmod 600 {key}" in " ".join(output.split()), output
    assert "Traceback" not in output
