"""The registry's memory of failed forwards, against an in-memory stand-in for Redis."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

from relay.hub import Hub
from relay.registry import Registry, RemoteMember


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
