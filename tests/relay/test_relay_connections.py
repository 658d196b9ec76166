"""Connections: credential validation, sealing, secrecy at rest, in responses and in logs."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import structlog

from backhaul.errors import SealError
from backhaul.seal import GatewayKeyPair, open_sealed
from relay.store import Forbidden, NotFound, queries
from tests.relay.relay_helpers import Enrolled, Relay, assert_problem, gateway_with_member

PASSWORD = "Pa55-very-SECRET-value-93f1c7"
API_KEY = "key-2b7e151628aed2a6abf71588-secret"


async def connector(relay: Relay, token: str, gw: Enrolled, auth: str, **extra: Any) -> dict:
    body = {
        "name": f"api-{auth}",
        "base_url": "https://api.corp.local/v1",
        "auth_type": auth,
        "gateway_id": gw.gateway_id,
        **extra,
    }
    r = await relay.call("POST", "/v1/connectors", token, body)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def connection(relay: Relay, token: str, connector_id: str, creds: dict) -> dict:
    r = await relay.call(
        "POST", "/v1/connections", token, {"connector_id": connector_id, "credentials": creds}
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def load(relay: Relay, connection_id: str) -> Any:
    async with relay.app.state.db() as session:
        return await queries.invoke_target(session, connection_id, relay.admin_id, True)


@pytest.mark.parametrize(
    ("auth", "extra", "creds"),
    [
        ("none", {}, {}),
        ("basic", {}, {"username": "svc", "password": PASSWORD}),
        ("api_key", {"api_key_name": "X-Key"}, {"api_key": API_KEY}),
    ],
)
async def test_sealed_blob_opens_only_for_its_connection(
    relay: Relay, auth: str, extra: dict, creds: dict
) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    ctr = await connector(relay, relay.admin_token, gw, auth, **extra)
    cxn = await connection(relay, relay.admin_token, ctr["id"], creds)
    assert cxn["id"].startswith("cxn_") and cxn["owner_id"] == relay.admin_id
    target = await load(relay, cxn["id"])
    assert target.base_url == "https://api.corp.local/v1/"
    assert target.gateway_id == gw.gateway_id and target.auth_type == auth
    opened = open_sealed(
        gw.key, target.seal_suite, target.sealed_credentials, cxn["id"], target.base_url
    )
    assert opened == creds
    with pytest.raises(SealError):
        open_sealed(
            gw.key, target.seal_suite, target.sealed_credentials, "cxn_other", target.base_url
        )
    with pytest.raises(SealError):
        open_sealed(
            GatewayKeyPair.generate(),
            target.seal_suite,
            target.sealed_credentials,
            cxn["id"],
            target.base_url,
        )


async def test_credentials_never_leave_in_clear(
    relay: Relay, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await gateway_with_member(relay, relay.admin_token)
    basic = await connector(relay, relay.admin_token, gw, "basic")
    keyed = await connector(
        relay, relay.admin_token, gw, "api_key", api_key_name="k", api_key_in="query"
    )
    bodies: list[str] = []
    with structlog.testing.capture_logs() as logs:
        for r in [
            await relay.call(
                "POST",
                "/v1/connections",
                relay.admin_token,
                {
                    "connector_id": basic["id"],
                    "credentials": {"username": "u", "password": PASSWORD},
                },
            ),
            await relay.call(
                "POST",
                "/v1/connections",
                relay.admin_token,
                {"connector_id": keyed["id"], "credentials": {"api_key": API_KEY}},
            ),
            # validation failures must not echo the value either
            await relay.call(
                "POST",
                "/v1/connections",
                relay.admin_token,
                {"connector_id": basic["id"], "credentials": {"username": "u", "pwd": PASSWORD}},
            ),
            await relay.call(
                "POST",
                "/v1/connections",
                relay.admin_token,
                {"connector_id": keyed["id"], "credentials": {"api_key": 5, "extra": PASSWORD}},
            ),
            await relay.call(
                "POST",
                "/v1/connections",
                relay.admin_token,
                {"connector_id": keyed["id"], "credentials": PASSWORD},
            ),
            await relay.call("GET", "/v1/connections", relay.admin_token),
        ]:
            bodies.append(r.text)
        cxn_id = (await relay.call("GET", "/v1/connections", relay.admin_token)).json()[0]["id"]
        r = await relay.call(
            "PUT",
            f"/v1/connections/{cxn_id}/credentials",
            relay.admin_token,
            {"credentials": {"username": "u2", "password": PASSWORD + "2"}},
        )
        assert r.status_code == 200, r.text
        bodies.append(r.text)
    captured = capsys.readouterr()
    everything = "\n".join(bodies) + repr(logs) + captured.out + captured.err + caplog.text
    raw = relay.db_bytes()
    for secret in (PASSWORD, API_KEY, PASSWORD + "2"):
        assert secret not in everything
        assert secret.encode() not in raw
        assert secret.encode("utf-16-le") not in raw


@pytest.mark.parametrize(
    ("auth", "creds", "field"),
    [
        ("none", {"password": "x"}, "credentials.password"),
        ("basic", {"username": "u"}, "credentials.password"),
        ("basic", {"password": "p"}, "credentials.username"),
        ("basic", {"username": "u", "password": 1}, "credentials.password"),
        ("basic", {"username": "u", "password": ""}, "credentials.password"),
        ("api_key", {}, "credentials.api_key"),
        ("api_key", {"api_key": "k", "username": "u"}, "credentials.username"),
    ],
)
async def test_credentials_are_validated_per_auth_type(
    relay: Relay, auth: str, creds: dict, field: str
) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    extra = {"api_key_name": "k"} if auth == "api_key" else {}
    ctr = await connector(relay, relay.admin_token, gw, auth, **extra)
    r = await relay.call(
        "POST",
        "/v1/connections",
        relay.admin_token,
        {"connector_id": ctr["id"], "credentials": creds},
    )
    problem = assert_problem(r, 422)
    assert field in problem["detail"]


async def test_gateway_without_key_is_409(relay: Relay) -> None:
    gw = (await relay.call("POST", "/v1/gateways", relay.admin_token, {"name": "empty"})).json()
    body = {"name": "x", "base_url": "https://h/", "auth_type": "none", "gateway_id": gw["id"]}
    ctr = (await relay.call("POST", "/v1/connectors", relay.admin_token, body)).json()
    r = await relay.call(
        "POST", "/v1/connections", relay.admin_token, {"connector_id": ctr["id"], "credentials": {}}
    )
    assert "enroll" in assert_problem(r, 409)["detail"]


async def test_sharing_and_invoke_target(relay: Relay) -> None:
    alice = await relay.user("alice")
    bob = await relay.user("bob")
    carol = await relay.user("carol")
    gw = await gateway_with_member(relay, alice["token"])
    ctr = await connector(relay, alice["token"], gw, "basic")
    cxn = await connection(
        relay, alice["token"], ctr["id"], {"username": "a", "password": PASSWORD}
    )

    async def target(user_id: str, is_admin: bool = False) -> Any:
        async with relay.app.state.db() as session:
            return await queries.invoke_target(session, cxn["id"], user_id, is_admin)

    assert (await target(alice["id"])).connection_id == cxn["id"]
    with pytest.raises(Forbidden):
        await target(bob["id"])
    with pytest.raises(Forbidden):
        await target(relay.admin_id, True)
    with pytest.raises(NotFound):
        async with relay.app.state.db() as session:
            await queries.invoke_target(session, "cxn_missing", alice["id"], False)

    # bob cannot see it, nor share it
    assert_problem(await relay.call("GET", f"/v1/connections/{cxn['id']}", bob["token"]), 404)
    share_url = f"/v1/connections/{cxn['id']}/shares"
    assert_problem(await relay.call("POST", share_url, bob["token"], {"user_id": bob["id"]}), 404)

    r = await relay.call("POST", share_url, alice["token"], {"user_id": bob["id"]})
    assert r.status_code == 201, r.text
    assert r.json()["user_id"] == bob["id"]
    assert_problem(await relay.call("POST", share_url, alice["token"], {"user_id": bob["id"]}), 409)
    assert_problem(await relay.call("POST", share_url, alice["token"], {"user_id": "usr_x"}), 404)
    assert (await target(bob["id"])).connection_id == cxn["id"]
    listed = (await relay.call("GET", "/v1/connections", bob["token"])).json()
    assert [c["id"] for c in listed] == [cxn["id"]]
    assert (await relay.call("GET", "/v1/connections", carol["token"])).json() == []
    shares = (await relay.call("GET", share_url, alice["token"])).json()
    assert [s["user_id"] for s in shares] == [bob["id"]]

    # a share holder may use but not change the connection
    assert_problem(await relay.call("GET", share_url, bob["token"]), 403)
    assert_problem(await relay.call("DELETE", f"/v1/connections/{cxn['id']}", bob["token"]), 403)
    r = await relay.call(
        "PUT", f"/v1/connections/{cxn['id']}/credentials", bob["token"], {"credentials": {}}
    )
    assert_problem(r, 403)
    r = await relay.call("POST", share_url, bob["token"], {"user_id": carol["id"]})
    assert_problem(r, 403)

    # admins see metadata and manage shares, but still may not invoke
    assert (
        await relay.call("GET", f"/v1/connections/{cxn['id']}", relay.admin_token)
    ).status_code == 200

    assert (
        await relay.call("DELETE", f"{share_url}/{bob['id']}", alice["token"])
    ).status_code == 204
    with pytest.raises(Forbidden):
        await target(bob["id"])
    assert_problem(await relay.call("DELETE", f"{share_url}/{bob['id']}", alice["token"]), 404)

    assert (
        await relay.call("DELETE", f"/v1/connections/{cxn['id']}", alice["token"])
    ).status_code == 204
    with pytest.raises(NotFound):
        await target(alice["id"])


async def test_reseal_replaces_the_blob(relay: Relay) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    ctr = await connector(relay, relay.admin_token, gw, "api_key", api_key_name="k")
    cxn = await connection(relay, relay.admin_token, ctr["id"], {"api_key": "old"})
    r = await relay.call(
        "PUT",
        f"/v1/connections/{cxn['id']}/credentials",
        relay.admin_token,
        {"credentials": {"api_key": "new"}},
    )
    assert r.status_code == 200
    target = await load(relay, cxn["id"])
    opened = open_sealed(
        gw.key, target.seal_suite, target.sealed_credentials, cxn["id"], target.base_url
    )
    assert opened == {"api_key": "new"}
