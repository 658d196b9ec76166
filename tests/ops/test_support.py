"""``backhaul-agent logs export``: a real agent writes its rotated log file; the zip has the
logs, the masked configuration, the live status and the versions — and never a key, a proxy
password or a token."""

from __future__ import annotations

import json
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest

from agent.config import load_config
from agent.support import ExportError, export
from backhaul.devstack import DevStack, command
from tests.ops.helpers import api_base, connected, wait_status

PROXY_PASSWORD = "Pr0xy-pass-never-exported"


def test_export_a_running_agents_bundle(ops_stack: DevStack, tmp_path: Path) -> None:
    _gateway, config_dir = ops_stack.enroll(name="support", allow=[api_base(ops_stack)])
    ops_stack.set_agent_config(
        config_dir,
        log={"file": "logs/agent.log", "max_file_mb": 1},
        # A proxy everyone bypasses: its password is in the file, the tunnel goes direct.
        proxy={"url": f"http://svc:{PROXY_PASSWORD}@proxy.invalid:3128", "no_proxy": ["*"]},
    )
    ops_stack.start_agent(config_dir, "support")
    try:
        wait_status(ops_stack, config_dir, connected)
        output = tmp_path / "bundle" / "support.zip"
        done = subprocess.run(
            [
                *(command("backhaul-agent"), "logs", "export"),
                *("--config-dir", str(config_dir), "--output", str(output)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        ops_stack.stop_process("support")
    assert output.stat().st_mode & 0o777 == 0o600
    with zipfile.ZipFile(output) as archive:
        names = set(archive.namelist())
        contents = {name: archive.read(name) for name in names}
    for name in (
        "manifest.json",
        "versions.json",
        "status.json",
        "config/agent.toml",
        "config/effective.json",
        "config/environment.json",
        "config/files.txt",
        "logs/agent.log",
    ):
        assert name in names, sorted(names)
    assert not any(name.startswith("keys") or name.endswith(".key") for name in names)
    status = json.loads(contents["status.json"])
    assert status["running"] and status["connected"]
    log_lines = contents["logs/agent.log"].decode().splitlines()
    assert any(json.loads(line)["event"] == "link.connected" for line in log_lines)
    toml = tomllib.loads(contents["config/agent.toml"].decode())
    assert toml["proxy"]["url"] == "http://svc:[redacted]@proxy.invalid:3128"
    assert "keys/member.key" in contents["config/files.txt"].decode()
    versions = json.loads(contents["versions.json"])
    assert versions["backhaul"] and "websockets" in versions["packages"]
    # Nothing secret anywhere: key material, the proxy password.
    secrets = [PROXY_PASSWORD.encode()]
    for key_file in (config_dir / "keys").iterdir():
        secrets += [line for line in key_file.read_bytes().splitlines() if len(line) > 16]
    assert len(secrets) > 2
    for name, data in contents.items():
        for secret in secrets:
            assert secret not in data, name


def test_export_refuses_when_a_secret_would_leak(ops_stack: DevStack, tmp_path: Path) -> None:
    """A password logged in a form no redaction rule knows still never leaves the machine."""
    _gateway, config_dir = ops_stack.enroll(name="leaky", allow=[api_base(ops_stack)])
    ops_stack.set_agent_config(
        config_dir,
        log={"file": "logs/agent.log"},
        proxy={"url": "http://proxy.invalid:3128", "username": "svc", "password": PROXY_PASSWORD},
    )
    (config_dir / "logs").mkdir()
    (config_dir / "logs" / "agent.log").write_text(f'{{"event": "oops {PROXY_PASSWORD}"}}\n')
    output = tmp_path / "support.zip"
    with pytest.raises(ExportError, match=r"logs/agent\.log would contain a secret"):
        export(load_config(config_dir, {}), output)
    assert not output.exists()
