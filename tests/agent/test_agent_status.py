from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from typer.testing import CliRunner

from agent.cli import app
from agent.config import AgentConfig, save_config
from agent.errors import AgentError, AgentNotRunning
from agent.state import AgentState
from agent.status import StatusServer, fetch_status
from backhaul.aio.tunnel import Tunnel

DOC_KEYS = {
    "connected",
    "relay",
    "session_id",
    "member_id",
    "gateway_id",
    "rtt_ms",
    "uptime_seconds",
    "connected_since",
    "inflight",
    "total",
    "failed",
    "last_error",
    "version",
    "reconnects",
    "draining",
    "tunnels",
}


@pytest.fixture
def cfg(make_config: Callable[..., AgentConfig]) -> AgentConfig:
    return make_config(status={"listen": "127.0.0.1:0"})


async def test_status_and_metrics_over_socket_and_tcp(cfg: AgentConfig) -> None:
    tracker = AgentState(relay=cfg.relay_url, member_id=cfg.member_id, gateway_id=cfg.gateway_id)
    tracker.tunnel = cast(Tunnel, SimpleNamespace(closed=False, rtt_ms=12.3, inflight=1))
    tracker.session_id = "ses_1"
    tracker.connected_since = datetime.now(UTC)
    tracker.total = 1
    tracker.bind_metrics()
    async with await StatusServer.for_config(cfg, tracker.snapshot) as server:
        sock = cfg.status.socket
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700

        doc = await fetch_status(cfg)
        assert set(doc) == DOC_KEYS
        assert doc["connected"] is True
        assert doc["session_id"] == "ses_1"
        assert doc["rtt_ms"] == 12.3
        assert doc["inflight"] == 1 and doc["total"] == 1 and doc["failed"] == 0
        assert doc["member_id"] == "mbr_test"

        [(host, port)] = server.tcp_addresses
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            assert "backhaul_agent_requests_total" in response.text
            assert "backhaul_agent_tunnel_connected 1.0" in response.text
            assert "backhaul_agent_rtt_seconds 0.0123" in response.text
            response = await client.get("/status?x=1")
            assert response.json()["session_id"] == "ses_1"
            assert (await client.get("/nope")).status_code == 404
            assert (await client.post("/status")).status_code == 405
            head = await client.head("/status")
            assert head.status_code == 200 and head.content == b""
            # Keep-alive: several requests on one connection.
            for _ in range(3):
                assert (await client.get("/status")).status_code == 200
    assert not sock.exists()


async def test_provider_failure_is_500_and_server_survives(cfg: AgentConfig) -> None:
    calls = 0

    def provider() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return {"connected": False}

    async with await StatusServer.for_config(cfg, provider) as server:
        [(host, port)] = server.tcp_addresses
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            assert (await client.get("/status")).status_code == 500
            assert (await client.get("/status")).json() == {"connected": False}


async def test_garbage_request_gets_400(cfg: AgentConfig) -> None:
    async with await StatusServer.for_config(cfg, dict) as server:
        [(host, port)] = server.tcp_addresses
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"NOT HTTP\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400")


async def test_stale_socket_replaced_live_one_refused(cfg: AgentConfig) -> None:
    sock = cfg.status.socket
    sock.parent.mkdir(parents=True)
    sock.write_text("stale")
    async with StatusServer(dict) as first:
        await first.start(sock)
        assert (await fetch_status(cfg)) == {}
        second = StatusServer(dict)
        with pytest.raises(AgentError, match="already serving"):
            await second.start(sock)


async def test_fetch_status_not_running(cfg: AgentConfig) -> None:
    with pytest.raises(AgentNotRunning, match="no status socket at"):
        await fetch_status(cfg)
    cfg.status.socket.parent.mkdir(parents=True)
    cfg.status.socket.write_text("")  # a file nobody listens on
    with pytest.raises(AgentNotRunning):
        await fetch_status(cfg)


@pytest.fixture
def running_server(cfg: AgentConfig) -> Iterator[StatusServer]:
    """A status server on its own loop in a thread, so the synchronous CLI can query it."""
    loop = asyncio.new_event_loop()
    server = StatusServer(
        AgentState(relay=cfg.relay_url, member_id=cfg.member_id, gateway_id=cfg.gateway_id).snapshot
    )
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start(cfg.status.socket))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield server
    asyncio.run_coroutine_threadsafe(server.aclose(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_cli_status_json_and_table(cfg: AgentConfig, running_server: StatusServer) -> None:
    save_config(cfg.config_file, cfg)
    runner = CliRunner()
    result = runner.invoke(app, ["status", "--config-dir", str(cfg.config_dir), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["running"] is True and doc["connected"] is False
    assert doc["gateway_id"] == "gw_test"
    result = runner.invoke(app, ["status", "--config-dir", str(cfg.config_dir)])
    assert result.exit_code == 0, result.output
    assert "disconnected" in result.stdout
    assert "gw_test" in result.stdout


def test_cli_status_not_running(cfg: AgentConfig) -> None:
    save_config(cfg.config_file, cfg)
    runner = CliRunner()
    result = runner.invoke(app, ["status", "--config-dir", str(cfg.config_dir), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["running"] is False and doc["connected"] is False
    assert doc["error"].startswith("agent is not running (no status socket at ")
    result = runner.invoke(app, ["status", "--config-dir", str(cfg.config_dir)])
    assert result.exit_code == 1
    assert "agent is not running" in result.stderr
    assert "Traceback" not in result.output


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["status", "--config-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "enroll first" in result.stderr
    (tmp_path / "agent.toml").write_text('relay_url = "ftp://x"\n')
    result = runner.invoke(app, ["run", "--config-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "relay_url:" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
