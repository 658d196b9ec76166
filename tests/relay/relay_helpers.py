"""Helpers: a relay app on a temporary SQLite database, driven in-process through httpx."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ed25519
from fastapi import FastAPI

from backhaul.keys import b64e
from backhaul.seal import GatewayKeyPair
from relay.app import create_app
from relay.config import RelayConfig
from relay.identity import ADMIN, hash_token, new_api_token
from relay.store import queries


@dataclass
class Relay:
    app: FastAPI
    client: httpx.AsyncClient
    data_dir: Path
    admin_token: str
    admin_id: str

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def call(
        self, method: str, path: str, token: str | None = None, json: Any = None
    ) -> httpx.Response:
        headers = self.auth(token) if token is not None else {}
        return await self.client.request(method, path, json=json, headers=headers)

    async def user(self, name: str, role: str = "user") -> dict[str, Any]:
        r = await self.call("POST", "/v1/users", self.admin_token, {"name": name, "role": role})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def db_bytes(self) -> bytes:
        """Every byte SQLite holds on disk: the main file, the WAL and its index."""
        blob = b""
        for path in self.data_dir.glob("relay.db*"):
            blob += path.read_bytes()
        return blob


@dataclass
class Enrolled:
    gateway_id: str
    member_id: str
    key: GatewayKeyPair


def signing_key_text() -> str:
    return b64e(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw())


async def enroll(
    relay: Relay, token: str, key: GatewayKeyPair | None = None, name: str = "agent-1"
) -> httpx.Response:
    key = key or GatewayKeyPair.generate()
    return await relay.call(
        "POST",
        "/v1/enroll",
        json={
            "token": token,
            "name": name,
            "hostname": f"{name}.corp.example",
            "version": "0.1.0",
            "signing_public_key": signing_key_text(),
            "hpke_public_key": key.public_text(),
        },
    )


async def gateway_with_member(relay: Relay, token: str, name: str = "gw") -> Enrolled:
    r = await relay.call("POST", "/v1/gateways", token, {"name": name})
    assert r.status_code == 201, r.text
    gw = r.json()
    key = GatewayKeyPair.generate()
    r = await enroll(relay, gw["enrollment_token"], key)
    assert r.status_code == 201, r.text
    return Enrolled(gw["id"], r.json()["member_id"], key)


def make_config(data_dir: Path, **overrides: Any) -> RelayConfig:
    return RelayConfig(dev=True, data_dir=data_dir, **overrides)


async def start(config: RelayConfig) -> AsyncIterator[Relay]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        async with app.state.db() as session:
            user = await queries.create_user(session, "root", ADMIN)
            token = new_api_token()
            await queries.add_api_token(session, user.id, hash_token(token))
            await session.commit()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://relay.test") as client:
            yield Relay(app, client, config.data_dir, token, user.id)


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    return dict(body)


@asynccontextmanager
async def serving(app: Any, protocol: Any, **options: Any) -> AsyncIterator[int]:
    """``app`` served by uvicorn with the HTTP ``protocol`` on a loopback port (yielded)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=protocol, lifespan="off", log_config=None, access_log=False, **options
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()
