"""API tokens, roles and user deletion."""

from __future__ import annotations

import asyncio
import datetime as dt
from types import SimpleNamespace
from typing import Any

from sqlalchemy import event, select

from relay import callers as caller_cache
from relay import identity
from relay.cache import GENERATION
from relay.store.models import ApiToken
from tests.relay.relay_helpers import Relay, assert_problem


async def test_me_with_token(relay: Relay) -> None:
    r = await relay.call("GET", "/v1/users/me", relay.admin_token)
    assert r.status_code == 200
    assert r.json()["name"] == "root"
    assert r.json()["role"] == "admin"


async def test_missing_token_is_401_with_challenge(relay: Relay) -> None:
    r = await relay.call("GET", "/v1/users/me")
    body = assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "missing" in body["detail"]


async def test_bad_tokens_are_401(relay: Relay) -> None:
    for token in ("bh_nope", "garbage", relay.admin_token + "x"):
        r = await relay.call("GET", "/v1/users/me", token)
        assert_problem(r, 401)
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    r = await relay.client.get("/v1/users/me", headers={"Authorization": "Basic dTpw"})
    assert_problem(r, 401)


async def test_every_api_route_needs_a_token(relay: Relay) -> None:
    anonymous = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/enroll"}
    for route in relay.app.routes:
        path = getattr(route, "path", "")
        methods = getattr(route, "methods", None) or set()
        if not path.startswith("/v1/") or path in anonymous or "invoke" in path:
            continue
        for method in methods - {"HEAD", "OPTIONS"}:
            url = path.replace("{", "").replace("}", "")
            r = await relay.client.request(method, url, json={})
            assert r.status_code == 401, (method, path, r.status_code)


async def test_tokens_are_stored_hashed(relay: Relay) -> None:
    alice = await relay.user("alice")
    r = await relay.call("POST", "/v1/tokens", alice["token"])
    assert r.status_code == 201
    second = r.json()["token"]
    assert second.startswith("bh_") and len(second) > 40
    assert (await relay.call("GET", "/v1/users/me", second)).json()["id"] == alice["id"]
    raw = relay.db_bytes()
    for token in (relay.admin_token, alice["token"], second):
        assert token.encode() not in raw
        assert token[3:].encode() not in raw


async def test_non_admin_cannot_create_or_delete_users(relay: Relay) -> None:
    bob = await relay.user("bob")
    r = await relay.call("POST", "/v1/users", bob["token"], {"name": "mallory"})
    assert_problem(r, 403)
    r = await relay.call("DELETE", f"/v1/users/{relay.admin_id}", bob["token"])
    assert_problem(r, 403)


async def test_duplicate_user_name_is_409(relay: Relay) -> None:
    await relay.user("carol")
    r = await relay.call("POST", "/v1/users", relay.admin_token, {"name": "carol"})
    assert_problem(r, 409)


async def test_invalid_user_body_is_422_problem(relay: Relay) -> None:
    r = await relay.call("POST", "/v1/users", relay.admin_token, {"name": "x y", "role": "god"})
    body = assert_problem(r, 422)
    assert "name" in body["detail"] and "role" in body["detail"]


async def test_deleted_user_token_is_refused_at_once(relay: Relay) -> None:
    dave = await relay.user("dave")
    extra = (await relay.call("POST", "/v1/tokens", dave["token"])).json()["token"]
    assert (await relay.call("GET", "/v1/users/me", dave["token"])).status_code == 200
    r = await relay.call("DELETE", f"/v1/users/{dave['id']}", relay.admin_token)
    assert r.status_code == 204
    for token in (dave["token"], extra):
        assert_problem(await relay.call("GET", "/v1/users/me", token), 401)
    assert_problem(await relay.call("DELETE", f"/v1/users/{dave['id']}", relay.admin_token), 404)


async def test_admin_cannot_delete_self(relay: Relay) -> None:
    assert_problem(
        await relay.call("DELETE", f"/v1/users/{relay.admin_id}", relay.admin_token), 409
    )


async def _last_used(relay: Relay, token: str) -> dt.datetime | None:
    async with relay.app.state.engine.connect() as conn:
        found = await conn.execute(
            select(ApiToken.last_used_at).where(ApiToken.token_hash == identity.hash_token(token))
        )
        value: dt.datetime | None = found.scalar_one()
        return value


async def test_a_busy_tokens_use_is_written_once_in_the_background_and_keeps_the_caches(
    relay: Relay,
) -> None:
    """Once a minute a token's use is written: by one background write, whatever the
    number of requests then in flight, and not as a store change, which would drop every
    cached token and connection (all callers of a busy token used to find it due at the
    same moment and each open a database session for it)."""
    request: Any = SimpleNamespace(app=relay.app)
    token = relay.admin_token
    await identity.authenticate(request, token)
    await identity.drain()
    first = await _last_used(relay, token)
    assert first is not None

    checkouts: list[object] = []

    def checkout(*args: object) -> None:
        checkouts.append(args)

    pool = relay.app.state.engine.sync_engine.pool
    event.listen(pool, "checkout", checkout)
    generation = GENERATION.value
    digest = identity.hash_token(token)
    caller_cache.TOUCHED[digest] -= caller_cache.TOUCH_SECONDS  # a minute on
    try:
        callers = await asyncio.gather(*(identity.authenticate(request, token) for _ in range(50)))
        await identity.drain()
    finally:
        event.remove(pool, "checkout", checkout)
    assert {caller.id for caller in callers} == {relay.admin_id}
    assert len(checkouts) == 1  # the one write; every caller was served from the cache
    assert GENERATION.value == generation
    second = await _last_used(relay, token)
    assert second is not None and second > first

    await asyncio.gather(*(identity.authenticate(request, token) for _ in range(5)))
    assert len(caller_cache.touches) == 0  # not again within the minute


async def test_the_cached_caller_is_the_authenticated_one_and_nothing_else_is_known(
    relay: Relay,
) -> None:
    """relay.callers answers the invoke path for a token already authenticated; anything
    else (no token, another scheme's text, an unknown token, a token whose cache a store
    change dropped) is None, left to relay.identity.authenticate and its 401s."""
    engine = relay.app.state.engine
    token = relay.admin_token
    request: Any = SimpleNamespace(app=relay.app)
    for unknown in (None, "", "garbage", "bh_nope"):
        assert caller_cache.cached_caller(unknown, engine) is None
    GENERATION.bump(notify=False)  # as after a write to the store: the cache is stale
    assert caller_cache.cached_caller(token, engine) is None
    authenticated = await identity.authenticate(request, token)
    assert caller_cache.cached_caller(token, engine) == authenticated
    assert authenticated.id == relay.admin_id and authenticated.is_admin
    GENERATION.bump(notify=False)
    assert caller_cache.cached_caller(token, engine) is None
    await identity.drain()
