"""Hostile clients of a real relay process: slowloris, floods of tunnel WebSockets that never
finish the handshake, oversized heads, URLs, bodies and frames, forged and replayed handshake
signatures, spent enrollment tokens, deleted users, and callers over their rate limit. Each
is refused with a clear outcome while legitimate callers and agents keep being served."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from backhaul import handshake
from backhaul.devstack import DevStack, StackError
from backhaul.keys import generate_signing_key, load_signing_key
from backhaul.version import SUBPROTOCOL
from backhaul.wire import (
    CLOSE_CODE_BASE,
    Connection,
    ErrorCode,
    HelloReceived,
    Role,
    WelcomeReceived,
)
from tests.faults.harness import (
    FAULT_ENV,
    closed_by_peer,
    problem_of,
    read_response,
    relay_port,
    tls_socket,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

HEADER_TIMEOUT = 1.0
HANDSHAKE_TIMEOUT = 2.0
MAX_BODY = 1024 * 1024
HOSTILE_ENV = FAULT_ENV | {
    "BACKHAUL_RELAY_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
    "BACKHAUL_RELAY_HANDSHAKE_TIMEOUT_SECONDS": str(HANDSHAKE_TIMEOUT),
    "BACKHAUL_RELAY_MAX_BODY_BYTES": str(MAX_BODY),
    "BACKHAUL_RELAY_MAX_URL_BYTES": "4096",
    "BACKHAUL_RELAY_MAX_REQUEST_HEADER_BYTES": "16384",
    "BACKHAUL_RELAY_MAX_PENDING_HANDSHAKES": "1600",
    "BACKHAUL_RELAY_MAX_PENDING_HANDSHAKES_PER_ADDRESS": "64",
    "BACKHAUL_RELAY_RATE_LIMIT_PER_TOKEN": "0.5",
    "BACKHAUL_RELAY_RATE_LIMIT_PER_TOKEN_BURST": "40",
    "BACKHAUL_RELAY_RATE_LIMIT_PER_CONNECTION": "0.5",
    "BACKHAUL_RELAY_RATE_LIMIT_PER_CONNECTION_BURST": "20",
    "BACKHAUL_RELAY_ENROLLMENT_TTL_SECONDS": "5",
}


class Hostile:
    def __init__(self, stack: DevStack, api: str, gateway_id: str, agent_dir: Path) -> None:
        self.stack = stack
        self.api = api
        self.gateway_id = gateway_id
        self.agent_dir = agent_dir

    def connection(self, *shared_with: str) -> str:
        cid = self.stack.connection(self.gateway_id, self.api)
        for user_id in shared_with:
            self.stack.call("POST", f"/v1/connections/{cid}/shares", json={"user_id": user_id})
        return cid


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    with DevStack(tmp_path_factory.mktemp("hostile"), env=HOSTILE_ENV) as stack:
        stack.start_relay()
        stack.create_admin()
        api = stack.start_api()
        gateway_id, agent_dir = stack.enroll(name="steady", allow=[api])
        stack.start_agent(agent_dir)
        yield Hostile(stack, api, gateway_id, agent_dir)


def _served(h: Hostile, cid: str, token: str | None = None) -> float:
    """One legitimate invoke; returns its latency."""
    started = time.monotonic()
    with h.stack.client(token) as client:
        response = client.get(f"/v1/connections/{cid}/invoke/hello")
    assert response.status_code == 200, response.text
    return time.monotonic() - started


# ---------------------------------------------------------------- slow and oversized heads


def test_slowloris_is_cut_at_the_header_timeout_and_others_are_served(
    h_cid: str, hostile: Hostile
) -> None:
    stack = hostile.stack
    sockets = [tls_socket(stack) for _ in range(100)]
    silent = tls_socket(stack)  # connects and never sends a byte
    stop = threading.Event()
    opened = time.monotonic()

    def trickle() -> None:
        for sock in sockets:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")
        while not stop.wait(0.2):
            for sock in sockets:
                try:
                    sock.sendall(b"X-a: b\r\n")  # a header line every 0.2 s, never the end
                except OSError:
                    pass

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        latencies = [_served(hostile, h_cid) for _ in range(5)]
        assert max(latencies) < 1.0, latencies
        for sock in [*sockets, silent]:
            remaining = HEADER_TIMEOUT + 2.0 - (time.monotonic() - opened)
            assert closed_by_peer(sock, max(remaining, 0.1)), "a slow client was not cut"
        assert time.monotonic() - opened < HEADER_TIMEOUT + 2.0
    finally:
        stop.set()
        sender.join(5)
        for sock in [*sockets, silent]:
            sock.close()
    _served(hostile, h_cid)


def test_a_slow_header_sender_gets_a_408_problem(hostile: Hostile) -> None:
    sock = tls_socket(hostile.stack)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")
    status, headers, body = read_response(sock, timeout=HEADER_TIMEOUT + 2)
    sock.close()
    assert status == 408
    assert headers["connection"] == "close"
    assert problem_of(body)["status"] == 408


@pytest.mark.parametrize(
    ("target", "extra", "status"),
    [
        ("/healthz", "X-Big: " + "a" * 20000 + "\r\n", 431),
        ("/healthz", "".join(f"X-H{i}: {'b' * 100}\r\n" for i in range(200)), 431),
        ("/v1/connections/cxn_x/invoke/" + "p" * 5000, "", 414),
        ("/v1/connections/cxn_x/invoke/x?" + "q=1&" * 2000, "", 414),
        ("/" + "u" * 20000, "", 431),
    ],
    ids=["one-huge-header", "many-headers", "long-path", "long-query", "huge-request-line"],
)
def test_oversized_heads_and_urls_are_refused(
    hostile: Hostile, h_cid: str, target: str, extra: str, status: int
) -> None:
    sock = tls_socket(hostile.stack)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: relay\r\n{extra}\r\n".encode())
    got, headers, body = read_response(sock)
    sock.close()
    assert got == status
    assert headers["content-type"] == "application/problem+json"
    assert problem_of(body)["status"] == status
    _served(hostile, h_cid)


# ---------------------------------------------------------------- bodies


def test_body_over_the_limit_is_413_at_once_when_declared(hostile: Hostile, h_cid: str) -> None:
    sock = tls_socket(hostile.stack)
    sock.sendall(
        (
            f"POST /v1/connections/{h_cid}/invoke/upload HTTP/1.1\r\nHost: relay\r\n"
            f"Authorization: Bearer {hostile.stack.admin_token}\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
        ).encode()
    )  # the body is never sent: the answer must not wait for it
    status, _, body = read_response(sock, timeout=5)
    sock.close()
    assert status == 413
    assert problem_of(body)["title"] == "Content too large"


def test_streamed_body_over_the_limit_is_cut_with_413(hostile: Hostile, h_cid: str) -> None:
    sent = 0

    def body(total: int) -> Iterator[bytes]:
        nonlocal sent
        block = b"z" * 65536
        while sent < total:
            sent += len(block)
            yield block

    with hostile.stack.client() as client:
        url = f"/v1/connections/{h_cid}/invoke/upload"
        ok = client.post(url, content=body(MAX_BODY - 65536))  # chunked, under the limit
        assert ok.status_code == 200 and ok.json()["bytes"] == MAX_BODY - 65536
        sent = 0
        try:
            response = client.post(url, content=body(64 * MAX_BODY))
        except httpx.HTTPError:
            pytest.fail("the relay dropped the connection instead of answering 413")
    assert response.status_code == 413, response.text
    assert problem_of(response.content)["title"] == "Content too large"
    wait_for(lambda: hostile.stack.agent_status(hostile.agent_dir)["inflight"] == 0, 10)
    _served(hostile, h_cid)


# ---------------------------------------------------------------- rate limits


def test_rate_limits_per_connection_and_per_token(hostile: Hostile) -> None:
    stack = hostile.stack
    first_id, first = stack.create_user("rl-first")
    second_id, second = stack.create_user("rl-second")
    crowded = hostile.connection(first_id, second_id)
    quiet = hostile.connection(second_id)
    with stack.client(first) as client:
        statuses = [
            client.get(f"/v1/connections/{crowded}/invoke/hello").status_code for _ in range(20)
        ]
        assert statuses == [200] * 20  # the connection's burst
        refused = client.get(f"/v1/connections/{crowded}/invoke/hello")
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert problem_of(refused.content)["detail"].startswith("the rate limit of this connection")
    assert int(refused.headers["retry-after"]) >= 1
    # The connection's budget is shared by every caller; another connection is unaffected.
    with stack.client(second) as client:
        assert client.get(f"/v1/connections/{crowded}/invoke/hello").status_code == 429
        assert client.get(f"/v1/connections/{quiet}/invoke/hello").status_code == 200
    # One token spread over many connections runs out of its own budget (a burst of 40).
    spread = [hostile.connection(second_id) for _ in range(3)]
    with stack.client(second) as client:
        statuses = []
        for _ in range(15):
            for cid in spread:
                statuses.append(client.get(f"/v1/connections/{cid}/invoke/hello").status_code)
        refused = client.get(f"/v1/connections/{quiet}/invoke/hello")
    ok = statuses.count(200)
    assert 37 <= ok <= 40 and set(statuses[ok:]) == {429}, statuses
    assert refused.status_code == 429
    assert "API token" in problem_of(refused.content)["detail"]
    # Retry-After tells the truth.
    time.sleep(int(refused.headers["retry-after"]))
    _served(hostile, quiet, second)


@pytest.fixture(scope="module")
def h_cid(hostile: Hostile) -> str:
    return hostile.connection()


# ---------------------------------------------------------------- identity


def test_deleted_user_token_is_refused_at_once(hostile: Hostile) -> None:
    stack = hostile.stack
    user_id, token = stack.create_user("leaving")
    cid = hostile.connection(user_id)
    _served(hostile, cid, token)  # the token and the target are in the relay's cache now
    stack.call("DELETE", f"/v1/users/{user_id}")
    with stack.client(token) as client:
        response = client.get(f"/v1/connections/{cid}/invoke/hello")
    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers


def test_reused_and_expired_enrollment_tokens_are_refused(hostile: Hostile) -> None:
    stack = hostile.stack
    gateway = stack.call("POST", "/v1/gateways", json={"name": "tokens"})
    token = gateway["enrollment_token"]
    stack.enroll(gateway["id"], name="first", token=token, join=False)
    with pytest.raises(StackError, match="already used"):
        stack.enroll(gateway["id"], name="again", token=token)
    late = stack.call("POST", f"/v1/gateways/{gateway['id']}/enrollment-tokens")
    time.sleep(5.2)  # enrollment_ttl_seconds = 5 here
    with pytest.raises(StackError, match="expired"):
        stack.enroll(gateway["id"], name="late", token=late["enrollment_token"])


# ---------------------------------------------------------------- the tunnel handshake


def _member(agent_dir: Path) -> tuple[Any, str, str]:
    import tomllib

    doc = tomllib.loads((agent_dir / "agent.toml").read_text())
    return load_signing_key(agent_dir / "keys" / "member.key"), doc["member_id"], doc["gateway_id"]


async def _handshake(stack: DevStack, answer: Any) -> tuple[dict[str, Any] | None, int | None]:
    """Open a tunnel; ``answer(relay_hello)`` builds our HELLO. Returns (welcome, close code)."""
    url = stack.relay_url.replace("https://", "wss://") + "/v1/tunnel"
    async with connect(url, ssl=stack.tls(), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        conn = Connection(Role.AGENT)
        relay = next(
            e for e in conn.receive_message(await ws.recv()) if isinstance(e, HelloReceived)
        )
        conn.send_hello(answer(relay.payload))
        for message in conn.data_to_send():
            await ws.send(message)
        try:
            while True:  # a refusal is a GOAWAY, then the close with its code
                for event in conn.receive_message(await ws.recv()):
                    if isinstance(event, WelcomeReceived):
                        return event.payload, None
        except ConnectionClosed as exc:
            return None, exc.rcvd.code if exc.rcvd else None


async def test_wrong_and_replayed_signatures_are_refused(tmp_path: Path, hostile: Hostile) -> None:
    stack = hostile.stack
    gateway_id, agent_dir = stack.enroll(name="sig", allow=[hostile.api])
    key, member_id, gw = _member(agent_dir)
    assert gw == gateway_id
    captured: dict[str, Any] = {}

    def honest(relay: dict[str, Any]) -> dict[str, Any]:
        captured.update(handshake.agent_hello(relay, key, member_id, gw, "host"))
        return dict(captured)

    welcome, code = await _handshake(stack, honest)
    assert code is None and welcome is not None and welcome["member_id"] == member_id
    refused = CLOSE_CODE_BASE + ErrorCode.UNAUTHORIZED
    # The same HELLO again: its signature covers the old challenge.
    assert await _handshake(stack, lambda _: dict(captured)) == (None, refused)
    # A key that is not the member's.
    other = generate_signing_key()
    forged = await _handshake(stack, lambda r: handshake.agent_hello(r, other, member_id, gw, "h"))
    assert forged == (None, refused)
    # A valid signature, claimed for another member of another gateway.
    moved = await _handshake(
        stack, lambda r: handshake.agent_hello(r, key, "mbr_someone_else", gw, "h")
    )
    assert moved == (None, refused)
    assert "bad signature" in stack.log_text("relay")


# ---------------------------------------------------------------- floods of unfinished tunnels


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


async def _pending_tunnel(port: int, source: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    """Upgrade to a tunnel WebSocket, take the relay's HELLO, never answer; report what the
    relay did: the upgrade status, when HELLO came, and the close code and when."""
    out: dict[str, Any] = {}
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1", local_addr=(source, 0)
    )
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET /v1/tunnel HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
            ).encode()
        )
        out["upgrade_sent_at"] = time.monotonic()
        head = await reader.readuntil(b"\r\n\r\n")
        out["status"] = int(head.split()[1])
        if out["status"] != 101:
            out["retry_after"] = b"retry-after: 1" in head.lower()
            return out
        out["hello"] = False
        while True:
            opcode, payload = await _read_frame(reader)
            if opcode == 2 and payload[:1] == b"\x01":
                out["hello"] = True
            elif opcode == 8:
                out["closed_at"] = time.monotonic()
                out["close_code"] = struct.unpack("!H", payload[:2])[0]
                return out
    except (OSError, asyncio.IncompleteReadError) as exc:
        out["error"] = type(exc).__name__
        return out
    finally:
        writer.transport.abort()


async def test_thousands_of_unfinished_tunnels_time_out_and_agents_still_get_in(
    hostile: Hostile,
) -> None:
    stack = hostile.stack
    port = relay_port(stack)
    ctx = stack.tls()
    gateway_id, agent_dir = stack.enroll(name="during-flood", allow=[hostile.api])
    # 1500 sessions from 30 loopback addresses (50 each, under the per-address cap of 64).
    sources = [f"127.0.1.{i}" for i in range(1, 31)]
    flood_started = time.monotonic()
    flood = [
        asyncio.create_task(_pending_tunnel(port, sources[i % len(sources)], ctx))
        for i in range(1500)
    ]
    await asyncio.sleep(1.0)
    # Meanwhile: a legitimate agent connects and is served, from its own address.
    started = time.monotonic()
    await asyncio.to_thread(stack.start_agent, agent_dir, "during-flood")
    joined = time.monotonic() - started
    cid = await asyncio.to_thread(stack.connection, gateway_id, hostile.api)
    await asyncio.to_thread(_served, hostile, cid)
    # One address over its cap, then everyone over the total cap: refused at once with 503.
    greedy = await asyncio.gather(*(_pending_tunnel(port, "127.0.2.1", ctx) for _ in range(70)))
    results = await asyncio.gather(*flood)
    try:
        # The agent process starts and connects through 1500 live handshakes on two cores
        # that the flood's own client shares: seconds, not the backoff's minutes.
        assert joined < 20, f"the agent needed {joined:.1f}s to get in"
        statuses = [r.get("status") for r in results]
        counts = {s: statuses.count(s) for s in set(statuses)}
        # The flood's own 1500 TLS handshakes share this machine's cores with the relay: a
        # session whose client could not send its upgrade within the 1 s header timeout is
        # cut by that timeout (408), which is the relay doing its job too. Nothing else.
        # Runs here upgraded 964 to 1,500: at least half must, so that the flood is real.
        assert statuses.count(101) + statuses.count(408) == 1500, counts
        assert statuses.count(101) >= 750, counts
        upgraded = [r for r in results if r.get("status") == 101]
        # Under this load a HELLO may be late: the timeout closes the session all the same.
        assert sum(r["hello"] for r in upgraded) > 0.66 * len(upgraded)
        for r in upgraded:  # every one closed by the relay after the handshake timeout
            assert r.get("close_code") == CLOSE_CODE_BASE + ErrorCode.PROTOCOL_ERROR, r
            # Never before the timeout; late only by the time 1500 TLS handshakes take here.
            assert r["closed_at"] - r["upgrade_sent_at"] >= HANDSHAKE_TIMEOUT - 0.05, r
            assert r["closed_at"] - flood_started < HANDSHAKE_TIMEOUT + 15.0, r
        greedy_status = [r.get("status") for r in greedy]
        assert greedy_status.count(101) <= 64 and greedy_status.count(503) >= 6, greedy_status
        assert all(r["retry_after"] for r in greedy if r.get("status") == 503)
    finally:
        await asyncio.to_thread(stack.stop_process, "during-flood")


async def test_oversized_tunnel_frames_are_refused_before_they_are_buffered(
    hostile: Hostile, h_cid: str
) -> None:
    port = relay_port(hostile.stack)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=hostile.stack.tls(), server_hostname="127.0.0.1"
    )
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /v1/tunnel HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
        ).encode()
    )
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    await _read_frame(reader)  # HELLO
    # A binary frame announcing 64 MiB: only its header is ever sent.
    writer.write(bytes([0x82, 0xFF]) + struct.pack("!Q", 64 << 20) + os.urandom(4))
    await writer.drain()
    started = time.monotonic()
    opcode, payload = await asyncio.wait_for(_read_frame(reader), 5)
    writer.transport.abort()
    assert opcode == 8 and struct.unpack("!H", payload[:2])[0] == 1009  # message too big
    assert time.monotonic() - started < 1.0
    await asyncio.to_thread(_served, hostile, h_cid)


def test_the_relay_logged_no_unhandled_error(hostile: Hostile) -> None:
    """Last in this module: every hostile input above had a planned outcome."""
    log = hostile.stack.log_text("relay")
    assert "Exception in ASGI application" not in log
    assert '"unhandled error"' not in log
