"""Fixtures for the agent's tests: a config factory and a real local HTTP API (uvicorn)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import uvicorn

from agent.config import AgentConfig, config_from_dict


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., AgentConfig]:
    def factory(**overrides: Any) -> AgentConfig:
        data: dict[str, Any] = {
            "relay_url": "https://relay.example.com",
            "member_id": "mbr_test",
            "gateway_id": "gw_test",
            "name": "test-agent",
        }
        data.update(overrides)
        return config_from_dict(data, tmp_path)

    return factory


@dataclass
class Upstream:
    """State shared between a test and the in-process API."""

    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    first_upload_chunk: asyncio.Event = field(default_factory=asyncio.Event)
    client_got_download: asyncio.Event = field(default_factory=asyncio.Event)
    upload: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _app(state: Upstream) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        path = scope["path"]
        query = scope["query_string"].decode()
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]

        async def reply(
            status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
        ) -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), *(extra or [])],
                }
            )
            await send({"type": "http.response.body", "body": body})

        if path == "/api/upload":
            digest = hashlib.sha256()
            total = 0
            more = True
            while more:
                message = await receive()
                chunk = message.get("body", b"")
                if chunk:
                    total += len(chunk)
                    digest.update(chunk)
                    state.first_upload_chunk.set()
                more = message.get("more_body", False)
            state.upload = {"bytes": total, "sha256": digest.hexdigest(), "headers": headers}
            await reply(200, json.dumps(state.upload).encode())
            return

        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        record = {
            "method": scope["method"],
            "path": path,
            "raw_path": scope.get("raw_path", b"").decode("latin-1"),
            "query": query,
            "params": parse_qs(query),
            "headers": headers,
            "body": body.decode("latin-1"),
        }
        state.requests.append(record)

        if path == "/api/download":
            size = int(parse_qs(query)["size"][0])
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/octet-stream"),
                        (b"content-length", str(size).encode()),
                    ],
                }
            )
            chunk = b"x" * (256 * 1024)
            sent = 0
            while sent < size:
                piece = chunk[: size - sent]
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                sent += len(piece)
                if sent >= 4 * len(chunk) and not state.client_got_download.is_set():
                    # A client that buffers the whole body would never set this.
                    await asyncio.wait_for(state.client_got_download.wait(), 10)
            await send({"type": "http.response.body", "body": b""})
        elif path == "/api/slow":
            await asyncio.sleep(5)
            await reply(200, b"{}")
        elif path == "/api/stall":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            await asyncio.sleep(5)
            await send({"type": "http.response.body", "body": b""})
        elif path == "/api/cookie":
            await reply(200, json.dumps(record).encode(), [(b"set-cookie", b"session=abc")])
        else:
            await reply(200, json.dumps(record).encode(), [(b"x-upstream", b"yes")])

    return app


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    state.port = sock.getsockname()[1]
    config = uvicorn.Config(
        _app(state), lifespan="off", log_level="warning", access_log=False, http="h11"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    yield state
    server.should_exit = True
    server.force_exit = True
    await asyncio.wait_for(task, 10)
    sock.close()


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
