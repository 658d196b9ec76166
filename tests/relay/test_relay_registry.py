"""The registry's memory of failed forwards and its invalidations of the other instances'
caches, against in-memory stand-ins for Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

import pytest
import structlog

from relay import registry as registry_module
from relay.cache import GENERATION
from relay.hub import Hub
from relay.registry import INVALIDATE_ATTEMPTS, Registry, RemoteMember


class FakeRedis:
    """The three calls ``remote_members`` makes, over plain dicts."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.sets: dict[str, set[str]] = {}

    async def smembers(self, key: str) -> set[str]:
        return set(self.sets.get(key, set()))

    async def mget(self, keys: list[str]) -> list[str | None]:
        return [self.values.get(key) for key in keys]

    async def srem(self, key: str, member: str) -> None:
        self.sets.get(key, set()).discard(member)


def member(member_id: str, instance_id: str, url: str) -> RemoteMember:
    return RemoteMember(
        member_id=member_id,
        gateway_id="gw_1",
        instance_id=instance_id,
        url=url,
        session_id="ses_" + member_id,
        version="0.1.0",
        rtt_ms=None,
        inflight=0,
        total=0,
        cpu=None,
        memory=None,
        priority=0,
        disabled=False,
        draining=False,
        connected_at=0.0,
    )


def announce(redis: FakeRedis, view: RemoteMember) -> None:
    redis.values[f"bh:member:{view.member_id}"] = json.dumps(asdict(view))
    redis.sets.setdefault(f"bh:gateway:{view.gateway_id}", set()).add(view.member_id)


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "INVALIDATE_BACKOFF", 0.001)


def registry(redis: Any) -> Registry:
    reg = Registry(Hub("relay-w1"), "relay-w1", "https://127.0.0.1:1001", "redis://x/0", ttl=15)
    reg._redis = redis
    return reg


async def test_a_failed_instance_is_skipped_until_it_comes_back_elsewhere() -> None:
    redis = FakeRedis()
    old = member("mem_a", "relay-w2", "https://127.0.0.1:2002")
    announce(redis, old)
    reg = registry(redis)
    assert [m.url for m in await reg.remote_members("gw_1")] == [old.url]

    reg.mark_dead("relay-w2")  # the forward to :2002 failed: the worker died
    assert await reg.remote_members("gw_1") == []

    # The worker restarted under the same instance id at a new port, and the agent's tunnel
    # moved to it: it is reachable again at once, not after the registry TTL.
    announce(redis, replace(old, url="https://127.0.0.1:3003", session_id="ses_new"))
    assert [m.url for m in await reg.remote_members("gw_1")] == ["https://127.0.0.1:3003"]


async def test_an_instance_marked_dead_before_any_listing_is_skipped_everywhere() -> None:
    redis = FakeRedis()
    announce(redis, member("mem_a", "relay-w2", "https://127.0.0.1:2002"))
    reg = registry(redis)
    reg.mark_dead("relay-w2")
    assert await reg.remote_members("gw_1") == []


class FlakyPublisher:
    """``publish`` fails ``failures`` times, then succeeds; ``aclose`` notes what was sent."""

    def __init__(self, failures: int, delay: float = 0.0) -> None:
        self.failures = failures
        self.delay = delay
        self.calls = 0
        self.published: list[dict[str, Any]] = []
        self.published_at_close: list[dict[str, Any]] | None = None

    async def publish(self, channel: str, data: str) -> None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.calls <= self.failures:
            raise ConnectionError("Redis went away")
        self.published.append(json.loads(data))

    async def delete(self, key: str) -> None:
        return None

    async def aclose(self) -> None:
        self.published_at_close = list(self.published)


async def test_a_local_write_reaches_the_other_instances_despite_failed_publishes() -> None:
    """A cached read never expires, so an invalidation that was lost would leave the other
    instances serving what the write changed: the publish is retried."""
    redis = FlakyPublisher(failures=2)
    reg = registry(redis)
    reg._store_changed()
    await reg._pending.drain()
    assert redis.calls == 3
    assert [event["kind"] for event in redis.published] == ["invalidate"]
    assert [event["from"] for event in redis.published] == ["relay-w1"]


async def test_an_invalidation_that_never_gets_through_is_logged() -> None:
    redis = FlakyPublisher(failures=99)
    reg = registry(redis)
    with structlog.testing.capture_logs() as logs:
        reg._store_changed()
        await reg._pending.drain()
    assert redis.calls == INVALIDATE_ATTEMPTS
    failures = [entry for entry in logs if entry["event"] == "registry.invalidate_failed"]
    assert [entry["attempt"] for entry in failures] == list(range(1, INVALIDATE_ATTEMPTS + 1))


async def test_stop_sends_the_invalidations_still_in_flight_before_closing() -> None:
    redis = FlakyPublisher(failures=0, delay=0.05)
    reg = registry(redis)
    reg._store_changed()
    await reg.stop()
    assert redis.published_at_close is not None
    assert [event["kind"] for event in redis.published_at_close] == ["invalidate"]


async def test_stop_does_not_wait_for_ever_on_a_publish_that_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry_module, "STOP_GRACE_SECONDS", 0.1)
    redis = FlakyPublisher(failures=0, delay=60)
    reg = registry(redis)
    reg._store_changed()
    async with asyncio.timeout(5):
        await reg.stop()
    assert len(reg._pending) == 0
    assert redis.published_at_close == []


class SilentPubSub:
    """A subscription on which nothing is ever published."""

    def __init__(self, subscribed: asyncio.Event) -> None:
        self.subscribed = subscribed

    async def __aenter__(self) -> SilentPubSub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def subscribe(self, channel: str) -> None:
        self.subscribed.set()

    async def listen(self) -> AsyncIterator[dict[str, Any]]:
        await asyncio.Event().wait()
        yield {}


async def test_subscribing_drops_the_reads_cached_before_it() -> None:
    """Writes published while an instance was not subscribed (before it started, or while
    Redis was away) went past it: each subscription starts a new cache generation."""
    subscribed = asyncio.Event()

    class Subscriber:
        def pubsub(self) -> SilentPubSub:
            return SilentPubSub(subscribed)

    reg = registry(Subscriber())
    before = GENERATION.value
    listening = asyncio.create_task(reg._listen())
    try:
        async with asyncio.timeout(5):
            await subscribed.wait()
        assert GENERATION.value != before
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
