"""``trusted_proxies``: forwarded client addresses are believed from the named proxies only,
through uvicorn configured as the relay configures it (relay.workers.server_config); and no
``Server`` header on the relay's answers."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from backhaul.devstack import free_port
from backhaul.errors import ConfigError
from relay import tls
from relay.config import load_config
from relay.workers import server_config


async def _echo_client(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    body = json.dumps({"client": scope["client"][0], "scheme": scope["scheme"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def _seen(tmp_path: Path, trusted: list[str]) -> dict[str, str]:
    port = free_port()
    config = load_config(
        None,
        {"dev": True, "data_dir": tmp_path, "listen": f"127.0.0.1:{port}"},
        environ={"BACKHAUL_RELAY_TRUSTED_PROXIES": ",".join(trusted)} if trusted else {},
    )
    files = tls.resolve(config)
    server = uvicorn.Server(server_config(_echo_client, config, files))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        assert files.ca_file is not None
        verify = ssl.create_default_context(cafile=str(files.ca_file))
        async with httpx.AsyncClient(verify=verify) as client:
            r = await client.get(
                f"https://127.0.0.1:{port}/",
                headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"},
            )
        assert "server" not in r.headers  # the relay does not name its software
        assert "date" in r.headers
        result: dict[str, str] = r.json()
        return result
    finally:
        server.should_exit = True
        await task


async def test_forwarded_headers_are_ignored_by_default(tmp_path: Path) -> None:
    assert await _seen(tmp_path, []) == {"client": "127.0.0.1", "scheme": "https"}


async def test_a_trusted_proxy_forwards_the_client_address(tmp_path: Path) -> None:
    assert await _seen(tmp_path, ["127.0.0.1"]) == {"client": "203.0.113.9", "scheme": "http"}


async def test_an_untrusted_peer_is_not_believed(tmp_path: Path) -> None:
    seen = await _seen(tmp_path, ["10.0.0.0/8"])
    assert seen == {"client": "127.0.0.1", "scheme": "https"}


def test_trusted_proxies_must_be_addresses(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_config(
            None,
            {"dev": True, "data_dir": tmp_path},
            environ={"BACKHAUL_RELAY_TRUSTED_PROXIES": "proxy.example"},
        )
