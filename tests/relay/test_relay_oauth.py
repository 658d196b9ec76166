"""OAuth 2.0 for online connectors against a real authorization server (tests/relay/oauth_server).

The relay runs in-process; the authorization and resource server runs on a loopback port, so
every token request, redirect and API call crosses a real socket.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select, update

from relay import audit
from relay.store.models import OAuthState, OAuthToken
from tests.relay.oauth_server import ALICE, AuthServer, connector_definition
from tests.relay.online_helpers import CALLBACK, online_config
from tests.relay.relay_helpers import Relay, assert_problem, start

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[AuthServer]:
    running = AuthServer().start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def provider(server: AuthServer) -> Iterator[AuthServer]:
    """The shared server, reset to long-lived tokens and an empty log for each test."""
    server.state.expires_in = 3600
    server.state.log.clear()
    server.state.authorize_requests.clear()
    server.state.tokens.clear()
    server.state.by_refresh.clear()
    yield server


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    async for r in start(online_config(tmp_path / "data")):
        yield r


async def oauth_connection(
    relay: Relay,
    server: AuthServer,
    token: str | None = None,
    secret: str | None = None,
    **kwargs: Any,
) -> str:
    client = server.register(CALLBACK, secret=secret)
    body = connector_definition(server, client.client_id, **kwargs)
    if secret is not None:
        body["oauth"] = {"client_secret": secret}
    r = await relay.call("POST", "/v1/connectors/import", token or relay.admin_token, body)
    assert r.status_code == 201, r.text
    cxn = await relay.call(
        "POST", "/v1/connections", token or relay.admin_token, {"connector_id": r.json()["id"]}
    )
    assert cxn.status_code == 201, cxn.text
    return str(cxn.json()["id"])


async def authorize(relay: Relay, connection_id: str, token: str | None = None) -> str:
    r = await relay.call(
        "POST", f"/v1/connections/{connection_id}/oauth/start", token or relay.admin_token
    )
    assert r.status_code == 200, r.text
    return str(r.json()["authorize_url"])


async def browse(authorize_url: str, deny: bool = False) -> str:
    """What the owner's browser does at the provider: the callback URL it is sent back to."""
    async with httpx.AsyncClient() as browser:
        r = await browser.get(authorize_url + ("&deny=1" if deny else ""))
    assert r.status_code == 302, r.text
    location = r.headers["location"]
    assert location.startswith(CALLBACK)
    return location


async def callback(relay: Relay, location: str) -> httpx.Response:
    parts = urlsplit(location)
    return await relay.client.get(f"{parts.path}?{parts.query}")


async def consent(relay: Relay, connection_id: str, token: str | None = None) -> httpx.Response:
    return await callback(relay, await browse(await authorize(relay, connection_id, token)))


async def me(relay: Relay, connection_id: str, token: str | None = None) -> httpx.Response:
    return await relay.client.get(
        f"/v1/connections/{connection_id}/invoke/me", headers=relay.auth(token or relay.admin_token)
    )


async def test_consent_round_trip_with_pkce_then_invoke(relay: Relay, provider: AuthServer) -> None:
    cxn = await oauth_connection(relay, provider, custom={"prompt": "consent"})
    assert_problem(await me(relay, cxn), 409)  # not signed in yet
    url = await authorize(relay, cxn)
    asked = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert asked["response_type"] == "code" and asked["redirect_uri"] == CALLBACK
    assert asked["code_challenge_method"] == "S256" and len(asked["state"]) >= 43
    assert asked["scope"] == "read offline_access" and asked["prompt"] == "consent"
    done = await callback(relay, await browse(url))
    assert done.status_code == 200, done.text
    assert done.json()["connection_id"] == cxn and done.json()["status"] == "connected"
    (form,) = provider.grants("authorization_code")
    digest = hashlib.sha256(form["code_verifier"].encode()).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == asked["code_challenge"]
    assert "client_secret" not in form  # a public client: PKCE is its proof
    status = (await relay.call("GET", f"/v1/connections/{cxn}/oauth", relay.admin_token)).json()
    assert status["connected"] and status["refreshable"]
    r = await me(relay, cxn)
    assert r.status_code == 200, r.text
    assert r.json()["user"] == ALICE
    stored = relay.db_bytes()
    assert r.json()["token"].encode() not in stored
    assert form["code_verifier"].encode() not in stored
    await audit.drain()
    events = (await relay.call("GET", "/v1/audit?action=oauth.consent", relay.admin_token)).json()
    assert [(e["object_id"], e["result"]) for e in events] == [(cxn, "ok")]


async def test_confidential_client_sends_its_encrypted_secret(
    relay: Relay, provider: AuthServer
) -> None:
    secret = "client-secret-that-must-not-be-stored-in-clear"
    cxn = await oauth_connection(relay, provider, secret=secret)
    assert (await consent(relay, cxn)).status_code == 200
    (form,) = provider.grants("authorization_code")
    assert form["client_secret"] == secret and form["code_verifier"]
    assert (await me(relay, cxn)).status_code == 200
    assert secret.encode() not in relay.db_bytes()


async def test_mismatched_unknown_reused_and_expired_states_are_refused(
    relay: Relay, provider: AuthServer
) -> None:
    first = await oauth_connection(relay, provider)
    second = await oauth_connection(relay, provider)
    to_first = await browse(await authorize(relay, first))
    to_second = await browse(await authorize(relay, second))
    # The first flow's code with the second flow's state: the relay redeems it with the
    # second flow's PKCE verifier, and the provider refuses.
    code = parse_qs(urlsplit(to_first).query)["code"][0]
    state = parse_qs(urlsplit(to_second).query)["state"][0]
    r = await relay.client.get(f"/v1/oauth/callback?code={code}&state={state}")
    assert "could not be redeemed" in assert_problem(r, 400)["detail"]
    assert not (
        await relay.call("GET", f"/v1/connections/{second}/oauth", relay.admin_token)
    ).json()["connected"]
    assert "already used" in assert_problem(await callback(relay, to_second), 400)["detail"]
    tampered = to_first.replace("state=", "state=x")
    assert "unknown" in assert_problem(await callback(relay, tampered), 400)["detail"]
    assert_problem(await relay.client.get("/v1/oauth/callback?code=abc"), 400)
    assert (await callback(relay, to_first)).status_code == 200
    assert "already used" in assert_problem(await callback(relay, to_first), 400)["detail"]

    late = await browse(await authorize(relay, second))
    async with relay.app.state.db() as session:
        await session.execute(update(OAuthState).values(expires_at=OAuthState.created_at))
        await session.commit()
    assert "expired" in assert_problem(await callback(relay, late), 400)["detail"]


async def test_refused_consent_and_who_may_start(relay: Relay, provider: AuthServer) -> None:
    alice, bob = await relay.user("alice"), await relay.user("bob")
    cxn = await oauth_connection(relay, provider, token=alice["token"])
    r = await callback(relay, await browse(await authorize(relay, cxn, alice["token"]), deny=True))
    assert "access_denied" in assert_problem(r, 400)["detail"]
    share = {"user_id": bob["id"]}
    assert (
        await relay.call("POST", f"/v1/connections/{cxn}/shares", alice["token"], share)
    ).status_code == 201
    assert_problem(
        await relay.call("POST", f"/v1/connections/{cxn}/oauth/start", bob["token"]), 403
    )
    assert_problem(
        await relay.call("POST", f"/v1/connections/{cxn}/oauth/start", relay.admin_token), 404
    )
    assert (await consent(relay, cxn, alice["token"])).status_code == 200
    assert (await me(relay, cxn, bob["token"])).json()["user"] == ALICE  # the owner's account


async def test_refresh_before_expiry_once_for_concurrent_requests(
    relay: Relay, provider: AuthServer
) -> None:
    cxn = await oauth_connection(relay, provider)
    provider.state.expires_in = 2
    assert (await consent(relay, cxn)).status_code == 200
    first_token = (await me(relay, cxn)).json()["token"]
    assert provider.grants("refresh_token") == []
    await asyncio.sleep(1.2)  # now within the 1 s refresh margin
    answers = await asyncio.gather(*(me(relay, cxn) for _ in range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    assert len(provider.grants("refresh_token")) == 1
    assert {a.json()["token"] for a in answers} != {first_token}


async def test_a_401_refreshes_once_and_retries_once(relay: Relay, provider: AuthServer) -> None:
    cxn = await oauth_connection(relay, provider)
    assert (await consent(relay, cxn)).status_code == 200
    provider.revoke_access_tokens()  # still unexpired, but the API refuses them now
    assert (await me(relay, cxn)).status_code == 200
    assert len(provider.grants("refresh_token")) == 1
    provider.revoke_access_tokens()
    echoed = await relay.client.post(
        f"/v1/connections/{cxn}/invoke/echo",
        content=b"small body, buffered for the retry",
        headers=relay.auth(relay.admin_token) | {"content-type": "text/plain"},
    )
    assert echoed.status_code == 200 and echoed.content == b"small body, buffered for the retry"
    assert len(provider.grants("refresh_token")) == 2
    assert [p for p, _, _ in provider.state.log].count("/api/me") == 2


async def test_revoked_refresh_token_means_consent_again(
    relay: Relay, provider: AuthServer
) -> None:
    cxn = await oauth_connection(relay, provider)
    provider.state.expires_in = 1
    assert (await consent(relay, cxn)).status_code == 200
    provider.revoke_refresh_tokens()
    await asyncio.sleep(1.1)
    problem = assert_problem(await me(relay, cxn), 409)
    assert problem["title"] == "Consent required" and "invalid_grant" in problem["detail"]
    async with relay.app.state.db() as session:
        assert (await session.scalars(select(OAuthToken))).all() == []
    provider.state.expires_in = 3600
    assert (await consent(relay, cxn)).status_code == 200
    assert (await me(relay, cxn)).status_code == 200


async def test_long_download_outlives_the_access_token(relay: Relay, provider: AuthServer) -> None:
    cxn = await oauth_connection(relay, provider)
    provider.state.expires_in = 2
    assert (await consent(relay, cxn)).status_code == 200
    started = time.monotonic()
    size = 3 * 1024 * 1024
    r = await relay.client.get(
        f"/v1/connections/{cxn}/invoke/download?size={size}&seconds=3",
        headers=relay.auth(relay.admin_token),
    )
    assert time.monotonic() - started >= 2.5  # the token expired while the body streamed
    assert r.status_code == 200 and len(r.content) == size
    assert r.headers["x-token-expired-at-start"] == "false"
    assert provider.grants("refresh_token") == []  # nothing needed the token mid-download
    assert all(t.is_expired() for t in provider.state.tokens.values())
    assert (await me(relay, cxn)).status_code == 200  # the next request refreshes first
    assert len(provider.grants("refresh_token")) == 1


async def test_tokens_go_with_the_connection_and_are_bound_to_it(
    relay: Relay, provider: AuthServer
) -> None:
    signed = await oauth_connection(relay, provider)
    other = await oauth_connection(relay, provider)
    assert (await consent(relay, signed)).status_code == 200
    async with relay.app.state.db() as session:
        row = await session.get(OAuthToken, signed)
        assert row is not None
        session.add(
            OAuthToken(
                connection_id=other,
                sealed=row.sealed,
                expires_at=row.expires_at,
                has_refresh_token=True,
                updated_at=row.updated_at,
            )
        )
        await session.commit()
    assert "unusable" in assert_problem(await me(relay, other), 409)["detail"]
    assert (
        await relay.call("DELETE", f"/v1/connections/{signed}", relay.admin_token)
    ).status_code == 204
    async with relay.app.state.db() as session:
        assert await session.get(OAuthToken, signed) is None
    assert (
        await relay.call("DELETE", f"/v1/connections/{other}/oauth", relay.admin_token)
    ).status_code == 204
    assert not (
        await relay.call("GET", f"/v1/connections/{other}/oauth", relay.admin_token)
    ).json()["connected"]


@pytest.mark.parametrize(
    ("name", "scopes", "custom", "expect"),
    [
        (
            "aad",
            [],
            {"resourceUri": "https://api.example.net", "tenantId": "contoso"},
            {"resource": "https://api.example.net"},
        ),
        ("aad", ["User.Read"], {}, {"scope": "User.Read offline_access"}),
        ("github", ["repo"], {}, {"scope": "repo"}),
        ("microsoftaccount", ["wl.offline_access"], {}, {"scope": "wl.offline_access"}),
    ],
)
async def test_each_identity_provider_round_trips(
    relay: Relay,
    provider: AuthServer,
    name: str,
    scopes: list[str],
    custom: dict[str, str],
    expect: dict[str, str],
) -> None:
    provider.register(CALLBACK)  # scopes outside the client's are dropped by the server
    provider.state.clients = {
        k: v.__class__(
            v.client_id,
            v.client_secret,
            v.redirect_uris,
            scope=" ".join([*scopes, "offline_access", "read"]),
        )
        for k, v in provider.state.clients.items()
    }
    cxn = await oauth_connection(relay, provider, provider=name, scopes=scopes, custom=custom)
    assert (await consent(relay, cxn)).status_code == 200
    asked = provider.state.authorize_requests[-1]
    for key, value in expect.items():
        assert asked[key] == value
    if "resource" in expect:
        assert provider.grants("authorization_code")[-1]["resource"] == expect["resource"]
    assert (await me(relay, cxn)).json()["user"] == ALICE


async def test_without_a_secret_key_oauth_is_refused_clearly(
    tmp_path: Path, server: AuthServer
) -> None:
    async for relay in start(online_config(tmp_path / "d", secret_key=None)):
        cxn = await oauth_connection(relay, server)
        problem = assert_problem(
            await relay.call("POST", f"/v1/connections/{cxn}/oauth/start", relay.admin_token), 503
        )
        assert "secret_key" in problem["detail"]
