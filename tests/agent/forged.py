"""A forged relay for driving a real agent process: it accepts any member without checking
anything, then lets a test send whatever it likes down the tunnel.

Used by ``test_forged_relay.py`` and ``test_hostile_relay.py``: a compromised relay is the
agent's main adversary, so these tests talk to the real ``backhaul-agent run`` over real TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from websockets.asyncio.server import ServerConnection, serve

from backhaul import sampleapi
from backhaul.aio.tunnel import StreamError, TransportClosed, Tunnel
from backhaul.devstack import command
from backhaul.keys import b64e, generate_signing_key, save_signing_key, write_private
from backhaul.seal import GatewayKeyPair, seal
from backhaul.version import SUBPROTOCOL
from backhaul.wire import Connection, ErrorCode, HelloReceived, Role
from relay.tls import generate_dev_certificate

PASSWORD = "pw-forged-test"  # the sample API's test credential


class WsTransport:
    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws

    async def recv(self) -> bytes:
        try:
            data = await self.ws.recv()
        except Exception as exc:
            raise TransportClosed(str(exc)) from exc
        assert isinstance(data, bytes)
        return data

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send(data)
        except Exception as exc:
            raise TransportClosed(str(exc)) from exc

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


class ForgedRelay:
    """Welcomes every agent; each accepted tunnel is put on :attr:`tunnels`."""

    def __init__(self) -> None:
        self.tunnels: asyncio.Queue[Tunnel] = asyncio.Queue()

    async def handler(self, ws: ServerConnection) -> None:
        tunnel = Tunnel(Connection(Role.RELAY), WsTransport(ws), ping_interval=30)
        tunnel.conn.send_hello({"version": 1, "versions": [1], "challenge": b64e(b"\0" * 32)})
        await tunnel.flush()
        events = await tunnel.receive_events()
        assert any(isinstance(e, HelloReceived) for e in events)
        tunnel.conn.send_welcome({"session_id": "ses_forged"})
        await tunnel.flush()
        self.tunnels.put_nowait(tunnel)
        await tunnel.run()

    async def next_tunnel(self, timeout: float = 20) -> Tunnel:
        return await asyncio.wait_for(self.tunnels.get(), timeout)


@dataclass
class Forged:
    relay: ForgedRelay
    tunnel: Tunnel
    gateway: GatewayKeyPair
    api: str
    hole: str
    log: Path
    proc: subprocess.Popen[bytes]

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.startswith("{")]


@contextlib.asynccontextmanager
async def forged_relay(tmp_path: Path, **agent_doc: Any) -> AsyncIterator[Forged]:
    """A forged relay, the sample API, an API that never reads, and a real agent process
    enrolled with keys made here, allowed to call both APIs."""
    cert, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    generate_dev_certificate(cert, key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    relay = ForgedRelay()
    api = sampleapi.start_in_thread(basic=("alice", PASSWORD))
    # An internal API that accepts connections but never reads: uploads to it stall.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(8)
    hole = f"http://127.0.0.1:{blackhole.getsockname()[1]}/"
    async with serve(relay.handler, "127.0.0.1", 0, ssl=ctx, subprotocols=[SUBPROTOCOL]) as server:  # type: ignore[list-item]
        port = server.sockets[0].getsockname()[1]
        config_dir = tmp_path / "agent"
        gateway = GatewayKeyPair.generate()
        save_signing_key(config_dir / "keys" / "member.key", generate_signing_key())
        write_private(config_dir / "keys" / "gateway.key", b64e(gateway.to_bytes()).encode())
        doc = {
            "relay_url": f"https://127.0.0.1:{port}",
            "member_id": "mem_forged",
            "gateway_id": "gw_forged",
            "ca_file": str(cert),
            "allow": [{"prefix": api.url.rstrip("/") + "/"}, {"prefix": hole}],
            **agent_doc,
        }
        (config_dir / "agent.toml").write_text(tomli_w.dumps(doc))
        log = (tmp_path / "agent.log").open("wb")
        proc = subprocess.Popen(
            [command("backhaul-agent"), "run", "--config-dir", str(config_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"BACKHAUL_AGENT_LOG__FORMAT": "json", "PATH": "/usr/bin:/bin"},
        )
        try:
            yield Forged(
                relay=relay,
                tunnel=await relay.next_tunnel(),
                gateway=gateway,
                api=api.url.rstrip("/") + "/",
                hole=hole,
                log=tmp_path / "agent.log",
                proc=proc,
            )
        finally:
            proc.terminate()
            # Off the event loop: the forged relay must answer the agent's closing handshake.
            await asyncio.to_thread(proc.wait, 10)
            log.close()
            api.stop()
            blackhole.close()


def head(
    world: Forged,
    url: str,
    base: str | None = None,
    cid: str = "cxn_a",
    sealed_for: str | None = None,
) -> dict[str, Any]:
    """A well-formed request head, credentials sealed for ``sealed_for`` (default: ``cid``)."""
    base = base or world.api
    suite, blob = seal(
        world.gateway.public_text(),
        sealed_for or cid,
        base,
        {"username": "alice", "password": PASSWORD},
    )
    return {
        "method": "GET",
        "url": url,
        "headers": [],
        "connection_id": cid,
        "base_url": base,
        "auth": {"type": "basic", "api_key_name": None, "api_key_in": None},
        "suite": suite,
        "sealed": b64e(blob),
        "timeout_ms": 5000,
    }


async def outcome(tunnel: Tunnel, h: dict[str, Any], timeout: float = 10) -> int | ErrorCode:
    """The response status of one request, or the code the agent reset it with."""
    stream = await tunnel.open_stream(h, end_stream=True)
    try:
        response = await asyncio.wait_for(stream.response(), timeout)
        while await stream.read():
            pass
    except StreamError as exc:
        return exc.code
    return int(response["status"])
