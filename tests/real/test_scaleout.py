"""Relay scale-out against the machine's real PostgreSQL and Redis: two relay instances share
the database; a caller on instance B reaches an agent connected to instance A; revocation
spreads through Redis; when A dies the agent fails over to B and calls succeed again."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from backhaul.devstack import DevStack
from tests.e2e.conftest import FAST_ENV

pytestmark = pytest.mark.real

PG = "postgresql://127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    name = "backhaul_" + secrets.token_hex(4)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://127.0.0.1:5432/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def wait_for(check: object, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


def test_two_relays_share_postgres_and_route_through_redis(tmp_path: Path, database: str) -> None:
    env = FAST_ENV | {
        "BACKHAUL_RELAY_DATABASE_URL": database,
        "BACKHAUL_RELAY_REDIS_URL": REDIS,
        "BACKHAUL_RELAY_REGISTRY_TTL_SECONDS": "3",
    }
    with DevStack(tmp_path, env=env) as stack:
        url_a = stack.start_relay(name="relay", extra=["--instance-id", "relay-a"])
        url_b = stack.start_relay(name="relay-b", extra=["--instance-id", "relay-b"])
        stack.create_admin()
        api = stack.start_api()
        gateway_id, agent_dir = stack.enroll(name="agent", allow=[api])
        stack.set_agent_config(agent_dir, relay_urls=[url_a, url_b])
        stack.start_agent(agent_dir)
        cid = stack.connection(gateway_id, api)

        # The agent is on A; the caller is on B.
        with stack.client(relay="relay-b") as client_b:
            r = client_b.get(f"/v1/connections/{cid}/invoke/hello")
            assert r.status_code == 200, r.text
            assert r.headers["x-backhaul-instance"] == "relay-a"
            big = client_b.get(f"/v1/connections/{cid}/invoke/bytes/{8 << 20}")
            assert len(big.content) == 8 << 20
            up = client_b.post(f"/v1/connections/{cid}/invoke/upload", content=b"z" * (4 << 20))
            assert up.json()["bytes"] == 4 << 20
            member = client_b.get(f"/v1/gateways/{gateway_id}").json()["members"][0]
            assert member["online"] is True and member["instance"] == "relay-a"

            # Disabling on B takes effect on A within a second (Redis pub/sub).
            member_id = member["id"]
            assert (
                client_b.post(f"/v1/gateways/{gateway_id}/members/{member_id}/disable").status_code
                == 204
            )
            with stack.client(relay="relay") as client_a:
                took = wait_for(
                    lambda: client_a.get(f"/v1/connections/{cid}/invoke/hello").status_code == 503,
                    1.0,
                )
                assert took < 1.0
            client_b.post(f"/v1/gateways/{gateway_id}/members/{member_id}/enable")
            wait_for(
                lambda: client_b.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200,
                2.0,
            )

            # Instance A dies: the agent fails over to B, and calls on B succeed again.
            stack.stop_process("relay", signal.SIGKILL)
            wait_for(
                lambda: client_b.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200,
                15.0,
            )
            r = client_b.get(f"/v1/connections/{cid}/invoke/hello")
            assert "x-backhaul-instance" not in r.headers  # served by B's own tunnel
            assert stack.agent_status(agent_dir)["relay"] == url_b


def test_revocation_on_one_instance_disconnects_on_the_other(tmp_path: Path, database: str) -> None:
    env = FAST_ENV | {"BACKHAUL_RELAY_DATABASE_URL": database, "BACKHAUL_RELAY_REDIS_URL": REDIS}
    with DevStack(tmp_path, env=env) as stack:
        stack.start_relay(name="relay", extra=["--instance-id", "relay-a"])
        stack.start_relay(name="relay-b", extra=["--instance-id", "relay-b"])
        stack.create_admin()
        api = stack.start_api()
        gateway_id, agent_dir = stack.enroll(name="agent", allow=[api])
        proc = stack.start_agent(agent_dir)
        with stack.client(relay="relay-b") as client_b:
            member_id = client_b.get(f"/v1/gateways/{gateway_id}").json()["members"][0]["id"]
            started = time.monotonic()
            r = client_b.delete(f"/v1/gateways/{gateway_id}/members/{member_id}")
            assert r.status_code == 204
            wait_for(lambda: not stack.agent_status(agent_dir).get("connected"), 1.0)
            assert time.monotonic() - started < 1.5
        assert proc.wait(10) != 0
        assert "member revoked" in stack.log_text("agent")


def test_a_write_an_instance_did_not_hear_of_still_reaches_its_cache(
    tmp_path: Path, database: str
) -> None:
    """Relay A's subscription to the events is cut (Redis drops its connection), and a user is
    deleted through B before A has subscribed again: that invalidation reaches nobody. A starts
    a new cache generation when it subscribes again, so the user's token, which A had cached,
    stops working there too instead of working until A restarts."""
    env = FAST_ENV | {"BACKHAUL_RELAY_DATABASE_URL": database, "BACKHAUL_RELAY_REDIS_URL": REDIS}
    with DevStack(tmp_path, env=env) as stack:
        stack.start_relay(name="relay", extra=["--instance-id", "relay-a"])
        stack.start_relay(name="relay-b", extra=["--instance-id", "relay-b"])
        stack.create_admin()
        with stack.client(relay="relay-b") as admin_b:
            carol = admin_b.post("/v1/users", json={"name": "carol"}).json()
            with stack.client(token=carol["token"], relay="relay") as carol_a:
                assert carol_a.get("/v1/users/me").status_code == 200  # cached on A

                killed = asyncio.run(_kill_subscriptions())
                started = time.monotonic()
                assert admin_b.delete(f"/v1/users/{carol['id']}").status_code == 204
                # Only while A is not subscribed (it waits a second before it tries again)
                # does the deletion's invalidation go past it.
                assert time.monotonic() - started < 0.8
                assert killed >= 2  # A's subscription and B's

                wait_for(lambda: carol_a.get("/v1/users/me").status_code == 401, 10.0)
        assert "registry.events_lost" in stack.log_text("relay")


async def _kill_subscriptions() -> int:
    """Drop every pub/sub connection Redis has (the relays' subscriptions to ``bh:events``)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS)
    try:
        return int(await client.client_kill_filter(_type="pubsub"))
    finally:
        await client.aclose()
