"""The ``backhaul`` admin CLI against a real relay process."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent


@dataclass
class Served:
    url: str
    ca: Path
    token: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("relay")
    token = subprocess.run(
        [str(BIN / "backhaul-relay"), "create-admin", "root", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "backhaul-relay"),
            "serve",
            "--dev",
            "--data-dir",
            str(data),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"https://127.0.0.1:{port}"
    ca = data / "tls" / "relay.crt"
    deadline = time.monotonic() + 30
    while True:
        try:
            if ca.exists():
                httpx.get(
                    url + "/healthz", verify=ssl.create_default_context(cafile=str(ca)), timeout=2
                )
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "relay did not start"
        time.sleep(0.1)
    try:
        yield Served(url, ca, token)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def backhaul(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    full_env.update(env or {})
    return subprocess.run(
        [str(BIN / "backhaul"), *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=stdin,
        timeout=60,
    )


def test_status_json_and_table(served: Served) -> None:
    env = {
        "BACKHAUL_RELAY": served.url,
        "BACKHAUL_TOKEN": served.token,
        "BACKHAUL_CA_FILE": str(served.ca),
    }
    created = backhaul("gateways", "create", "plant-7", env=env)
    assert created.returncode == 0, created.stderr
    gw = json.loads(created.stdout)
    assert gw["enrollment_token"].startswith("bhe_")

    result = backhaul("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["relay"] == served.url
    [gateway] = [g for g in doc["gateways"] if g["id"] == gw["id"]]
    assert gateway["name"] == "plant-7" and gateway["members"] == []

    table = backhaul("status", env=env)
    assert table.returncode == 0, table.stderr
    assert "plant-7" in table.stdout and "in-flight" in table.stdout


def test_status_with_flags(served: Served) -> None:
    result = backhaul(
        "--relay",
        served.url,
        "--token",
        served.token,
        "--ca-file",
        str(served.ca),
        "status",
        "--json",
    )
    assert result.returncode == 0, result.stderr


def test_bad_token_is_one_line(served: Served) -> None:
    result = backhaul(
        "--relay", served.url, "--token", "bh_wrong", "--ca-file", str(served.ca), "status"
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "401" in result.stderr


def test_untrusted_certificate_is_one_line(served: Served) -> None:
    result = backhaul("--relay", served.url, "--token", served.token, "status")
    assert result.returncode == 1
    assert "certificate" in result.stderr and result.stderr.count("\n") == 1


def test_unreachable_relay_is_one_line(served: Served) -> None:
    url = f"https://127.0.0.1:{_free_port()}"
    result = backhaul(
        "--relay", url, "--token", served.token, "--ca-file", str(served.ca), "status"
    )
    assert result.returncode == 1
    assert "unreachable" in result.stderr and result.stderr.count("\n") == 1


def test_missing_token(served: Served) -> None:
    result = backhaul("--relay", served.url, "status")
    assert result.returncode == 1 and "token" in result.stderr
