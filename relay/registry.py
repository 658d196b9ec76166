"""Live tunnels across relay instances, in Redis; the local hub underneath.

Several relay instances behind a load balancer share one database. A caller's request may
land on an instance that holds no tunnel of the connector's gateway; the registry says which
instance does, and ``relay.forward`` streams the request there.

Redis keys (each written with a TTL and refreshed every ``ttl / 3``, so a dead instance's
entries vanish on their own — nobody has to clean up after a crash):

- ``bh:member:<member id>`` → JSON view of a live member (instance, URL, load, in-flight…)
- ``bh:gateway:<gateway id>`` → set of member ids seen live (pruned lazily on read)
- channel ``bh:events`` → revocations and member disable/enable, applied by every instance
  within one round trip (pub/sub), so "revoke" takes effect everywhere at once.

Without ``redis_url`` the registry is local only: the same interface, no Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from backhaul.aio.background import Background
from relay.cache import GENERATION
from relay.hub import Hub, LiveTunnel

log = structlog.get_logger("backhaul.relay.registry")

EVENTS = "bh:events"
#: Tries to tell the other instances of a local write before giving up (and logging it).
INVALIDATE_ATTEMPTS = 5
#: Seconds before the second try; each later one waits that much longer than the last.
INVALIDATE_BACKOFF = 0.2
#: How long stopping waits for the invalidations still being published.
STOP_GRACE_SECONDS = 3.0


@dataclass(frozen=True)
class RemoteMember:
    """A member live on some relay instance, as the registry last saw it."""

    member_id: str
    gateway_id: str
    instance_id: str
    url: str
    session_id: str
    version: str
    rtt_ms: float | None
    inflight: int
    total: int
    cpu: float | None
    memory: float | None
    priority: int
    disabled: bool
    draining: bool
    connected_at: float

    @classmethod
    def of(cls, live: LiveTunnel, url: str) -> RemoteMember:
        return cls(
            member_id=live.member_id,
            gateway_id=live.gateway_id,
            instance_id=live.instance_id,
            url=url,
            session_id=live.session_id,
            version=live.version,
            rtt_ms=live.rtt_ms,
            inflight=live.inflight,
            total=live.total,
            cpu=live.cpu,
            memory=live.memory,
            priority=live.priority,
            disabled=live.disabled,
            draining=live.draining,
            connected_at=live.connected_at,
        )


class Registry:
    def __init__(
        self,
        hub: Hub,
        instance_id: str,
        advertise_url: str,
        redis_url: str | None = None,
        ttl: float = 15.0,
    ) -> None:
        self.hub = hub
        self.instance_id = instance_id
        self.url = advertise_url
        self.ttl = ttl
        self._redis_url = redis_url
        self._redis: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Instances a forward to recently failed, with the address that failed: skipped
        #: until their entries expire. The address matters because a restarted worker
        #: (relay.workers) comes back under the same instance id at a new one.
        self._dead: dict[str, tuple[float, str | None]] = {}
        #: The address ``remote_members`` last gave out for each instance.
        self._urls: dict[str, str] = {}
        #: Publishes of local store writes, finished before the connection closes.
        self._pending = Background()

    @property
    def shared(self) -> bool:
        return self._redis is not None

    async def start(self) -> None:
        if not self._redis_url:
            return
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(self._redis_url, decode_responses=True)
        await self._redis.ping()
        self._tasks = [
            asyncio.create_task(self._refresh_loop()),
            asyncio.create_task(self._listen()),
        ]
        GENERATION.listeners.append(self._store_changed)
        log.info("registry.started", instance_id=self.instance_id, url=self.url)

    async def stop(self) -> None:
        if self._store_changed in GENERATION.listeners:
            GENERATION.listeners.remove(self._store_changed)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # The last writes' invalidations reach the others, unless Redis is away: then
        # stopping does not wait longer than the retries would.
        try:
            async with asyncio.timeout(STOP_GRACE_SECONDS):
                await self._pending.drain()
        except TimeoutError:
            await self._pending.cancel()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                for live in self.hub.local():
                    await self._redis.delete(_member_key(live.member_id))
                await self._redis.aclose()
            self._redis = None

    # -- announcing our own tunnels

    async def announce(self, live: LiveTunnel) -> None:
        if self._redis is None:
            return
        view = RemoteMember.of(live, self.url)
        pipe = self._redis.pipeline()
        pipe.set(_member_key(live.member_id), json.dumps(asdict(view)), ex=int(self.ttl))
        pipe.sadd(_gateway_key(live.gateway_id), live.member_id)
        await pipe.execute()

    async def withdraw(self, live: LiveTunnel) -> None:
        if self._redis is None:
            return
        key = _member_key(live.member_id)
        raw = await self._redis.get(key)
        if raw and json.loads(raw).get("session_id") == live.session_id:
            await self._redis.delete(key)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                for live in self.hub.local():
                    await self.announce(live)
            except Exception as exc:  # Redis down: keep serving local tunnels
                log.warning("registry.refresh_failed", error=str(exc))

    # -- finding members elsewhere

    async def remote_members(self, gateway_id: str) -> list[RemoteMember]:
        """Members of ``gateway_id`` live on *other* instances."""
        if self._redis is None:
            return []
        ids = sorted(await self._redis.smembers(_gateway_key(gateway_id)))
        if not ids:
            return []
        raws = await self._redis.mget([_member_key(i) for i in ids])
        now = time.monotonic()
        out = []
        for member_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                await self._redis.srem(_gateway_key(gateway_id), member_id)
                continue
            view = RemoteMember(**json.loads(raw))
            if view.instance_id == self.instance_id:
                continue
            until, failed_url = self._dead.get(view.instance_id, (0.0, None))
            if until > now and failed_url in (None, view.url):
                continue
            self._urls[view.instance_id] = view.url
            out.append(view)
        return out

    async def lookup(self, member_id: str) -> RemoteMember | None:
        if self._redis is None:
            return None
        raw = await self._redis.get(_member_key(member_id))
        return RemoteMember(**json.loads(raw)) if raw else None

    def mark_dead(self, instance_id: str) -> None:
        """A forward to ``instance_id`` failed: skip it until its entries expire, unless it
        shows up again at another address (it restarted and announced itself anew)."""
        self._dead[instance_id] = (time.monotonic() + self.ttl, self._urls.get(instance_id))

    # -- events applied on every instance

    async def disconnect(self, member_id: str, reason: str) -> None:
        """Close the member's tunnel wherever it is (revocation)."""
        await self.hub.disconnect(member_id, reason)
        await self._publish({"kind": "disconnect", "member_id": member_id, "reason": reason})

    async def set_disabled(self, member_id: str, disabled: bool) -> None:
        self.hub.set_disabled(member_id, disabled)
        await self._publish({"kind": "disabled", "member_id": member_id, "disabled": disabled})

    async def _publish(self, event: dict[str, Any]) -> None:
        if self._redis is not None:
            await self._redis.publish(EVENTS, json.dumps(event | {"from": self.instance_id}))

    async def _listen(self) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "disconnect": self._on_disconnect,
            "disabled": self._on_disabled,
            "invalidate": self._on_invalidate,
        }
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS)
                    # Writes published while this instance was not listening (before its
                    # first subscription, or while Redis was away) went past it: every
                    # cached read may be older than one of them.
                    GENERATION.bump(notify=False)
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        event = json.loads(message["data"])
                        if event.get("from") == self.instance_id:
                            continue
                        handler = handlers.get(str(event.get("kind")))
                        if handler is not None:
                            await handler(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("registry.events_lost", error=str(exc))
                await asyncio.sleep(1)

    async def _on_disconnect(self, event: dict[str, Any]) -> None:
        await self.hub.disconnect(str(event["member_id"]), str(event.get("reason", "revoked")))

    def _store_changed(self) -> None:
        """A local write: other instances drop their cached reads too (see relay.cache)."""
        self._pending.spawn(self._invalidate_others())

    async def _invalidate_others(self) -> None:
        """Tell the other instances, retrying: a cached read has no expiry, so an instance
        that missed this would go on serving what the write changed (a revoked token)."""
        for attempt in range(1, INVALIDATE_ATTEMPTS + 1):
            try:
                await self._publish({"kind": "invalidate"})
                return
            except Exception as exc:
                log.warning("registry.invalidate_failed", attempt=attempt, error=str(exc))
                if attempt < INVALIDATE_ATTEMPTS:
                    await asyncio.sleep(INVALIDATE_BACKOFF * attempt)

    async def _on_invalidate(self, _: dict[str, Any]) -> None:
        GENERATION.bump(notify=False)

    async def _on_disabled(self, event: dict[str, Any]) -> None:
        self.hub.set_disabled(str(event["member_id"]), bool(event.get("disabled")))


def _member_key(member_id: str) -> str:
    return f"bh:member:{member_id}"


def _gateway_key(gateway_id: str) -> str:
    return f"bh:gateway:{gateway_id}"
