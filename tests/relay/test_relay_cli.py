"""The ``backhaul-relay`` console script, run as a real process."""

from __future__ import annotations

import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent / "backhaul-relay"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60)


def test_create_admin_prints_only_the_token(tmp_path: Path) -> None:
    result = run("create-admin", "alice", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and result.stdout.endswith("\n")
    token = lines[0]
    assert token.startswith("bh_") and len(token) == 3 + 43
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("relay.db*"))
    assert token.encode() not in raw
    with sqlite3.connect(tmp_path / "relay.db") as db:
        assert db.execute("SELECT name, role FROM users").fetchall() == [("alice", "admin")]
    again = run("create-admin", "alice", "--data-dir", str(tmp_path))
    assert again.returncode == 1 and again.stdout == ""
    assert "already exists" in again.stderr


def test_create_admin_rejects_bad_name(tmp_path: Path) -> None:
    result = run("create-admin", "bad name", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and result.stdout == ""


def test_serve_refuses_without_tls(tmp_path: Path) -> None:
    result = run("serve", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:1")
    assert result.returncode == 2
    assert "tls_cert" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_dev_answers_over_tls(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN), "serve", "--dev", "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ca = tmp_path / "tls" / "relay.crt"
        deadline = time.monotonic() + 30
        while True:
            try:
                if ca.exists():
                    ctx = ssl.create_default_context(cafile=str(ca))
                    r = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx, timeout=2)
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "relay did not start"
            time.sleep(0.1)
        assert r.json() == {"status": "ok"}
        r = httpx.get(f"https://localhost:{port}/v1/users/me", verify=ctx, timeout=2)
        assert r.status_code == 401
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"https://127.0.0.1:{port}" in err
    assert str(tmp_path / "tls" / "relay.crt") in err
