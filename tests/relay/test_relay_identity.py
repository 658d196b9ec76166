"""API tokens, roles and user deletion."""

from __future__ import annotations

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
