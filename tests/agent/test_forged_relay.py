"""A real agent process against a forged relay: the agent must refuse what its own rules
forbid (targets outside its allow-list or the sealed base URL, credentials bound to another
connection, window violations, unknown frames) with a clear log line, and keep serving."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from websockets.asyncio.server import ServerConnection, serve

from backhaul import sampleapi
from backhaul.aio.tunnel import StreamError, Tunnel
from backhaul.devstack import command
from backhaul.keys import b64e, generate_signing_key, save_signing_key, write_private
from backhaul.seal import GatewayKeyPair, seal
from backhaul.version import SUBPROTOCOL
from backhaul.wire import Connection, ErrorCode, HelloReceived, Role
from backhaul.wire import frames as f
from relay.tls import generate_dev_certificate

pytestmark = pytest.mark.e2e


class WsTransport:
    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws

    async def recv(self) -> bytes:
        from backhaul.aio.tunnel import TransportClosed

        try:
            data = await self.ws.recv()
        except Exception as exc:
            raise TransportClosed(str(exc)) from exc
        assert isinstance(data, bytes)
        return data

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


class ForgedRelay:
    """Accepts any member without checking anything, then lets the test drive streams."""

    def __init__(self) -> None:
        self.tunnel: asyncio.Future[Tunnel] = asyncio.get_running_loop().create_future()

    async def handler(self, ws: ServerConnection) -> None:
        tunnel = Tunnel(Connection(Role.RELAY), WsTransport(ws), ping_interval=30)
        tunnel.conn.send_hello({"version": 1, "versions": [1], "challenge": b64e(b"\0" * 32)})
        await tunnel.flush()
        events = await tunnel.receive_events()
        assert any(isinstance(e, HelloReceived) for e in events)
        tunnel.conn.send_welcome({"session_id": "ses_forged"})
        await tunnel.flush()
        self.tunnel.set_result(tunnel)
        await tunnel.run()


@pytest.fixture
async def forged(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    cert, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    generate_dev_certificate(cert, key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    relay = ForgedRelay()
    api = sampleapi.start_in_thread(basic=("alice", "pw-forged-test"))
    # An internal API that accepts connections but never reads: uploads to it stall.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(8)
    hole = f"http://127.0.0.1:{blackhole.getsockname()[1]}/"
    async with serve(relay.handler, "127.0.0.1", 0, ssl=ctx, subprotocols=[SUBPROTOCOL]) as server:
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
            tunnel = await asyncio.wait_for(relay.tunnel, 20)
            yield {
                "tunnel": tunnel,
                "gateway": gateway,
                "api": api.url.rstrip("/") + "/",
                "hole": hole,
                "log": tmp_path / "agent.log",
                "proc": proc,
            }
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
            api.stop()
            blackhole.close()


def head(
    world: dict[str, Any],
    url: str,
    base: str | None = None,
    cid: str = "cxn_a",
    sealed_for: str | None = None,
) -> dict[str, Any]:
    base = base or world["api"]
    suite, blob = seal(
        world["gateway"].public_text(),
        sealed_for or cid,
        base,
        {"username": "alice", "password": "pw-forged-test"},
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


async def outcome(tunnel: Tunnel, h: dict[str, Any]) -> int | ErrorCode:
    stream = await tunnel.open_stream(h, end_stream=True)
    try:
        response = await asyncio.wait_for(stream.response(), 10)
    except StreamError as exc:
        return exc.code
    body = b""
    while chunk := await stream.read():
        body += chunk
    return int(response["status"])


async def test_agent_refuses_what_its_rules_forbid_and_keeps_serving(
    forged: dict[str, Any],
) -> None:
    tunnel: Tunnel = forged["tunnel"]
    api: str = forged["api"]
    ok = head(forged, api + "basic/x")
    assert await outcome(tunnel, ok) == 200

    # A target outside the allow-list, with a matching base URL (a relay lying about both).
    outside = "http://127.0.0.2:9/"
    assert await outcome(tunnel, head(forged, outside + "x", base=outside)) == (
        ErrorCode.TARGET_DENIED
    )
    # A target inside the allow-list but outside the sealed base URL.
    assert await outcome(tunnel, head(forged, api + "admin", base=api + "basic/")) == (
        ErrorCode.TARGET_DENIED
    )
    # Credentials sealed for another connection.
    moved = head(forged, api + "basic/x", cid="cxn_a", sealed_for="cxn_other")
    assert await outcome(tunnel, moved) == ErrorCode.CREDENTIALS_INVALID
    # A malformed head.
    bad = dict(ok, headers=[["x-bad", "a\r\nInjected: 1"]])
    assert await outcome(tunnel, bad) == ErrorCode.BAD_REQUEST
    # An unknown frame type is skipped.
    await tunnel.transport.send(f.HEADER.pack(0x7F, 0, 0) + b"junk")
    # A window violation on one stream resets that stream only. The upload goes to an API
    # that never reads, so the agent stops granting credit; the forged relay keeps sending.
    hole: str = forged["hole"]
    stream = await tunnel.open_stream(
        dict(head(forged, hole + "up", base=hole), method="POST", timeout_ms=60000)
    )
    piece = b"x" * tunnel.conn.peer.max_data
    for _ in range(512):  # up to 128 MiB, far beyond any window
        if stream.closed:
            break
        await tunnel.transport.send(f.encode(f.FrameType.DATA, stream.id, piece))
        await asyncio.sleep(0)
    with pytest.raises(StreamError) as info:
        await asyncio.wait_for(stream.response(), 10)
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR

    # And the agent still serves.
    assert await outcome(tunnel, ok) == 200
    assert forged["proc"].poll() is None
    lines = [json.loads(x) for x in forged["log"].read_text().splitlines() if x.startswith("{")]
    reasons = " ".join(str(x.get("reason", "")) for x in lines)
    assert "127.0.0.2" in reasons
    assert "pw-forged-test" not in forged["log"].read_text()
