"""Gateways and one-time enrollment tokens."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from backhaul.seal import GatewayKeyPair
from relay.api import enroll as enroll_module
from tests.relay.relay_helpers import Relay, assert_problem, enroll, signing_key_text


async def new_gateway(relay: Relay, token: str | None = None, name: str = "plant") -> dict:
    r = await relay.call("POST", "/v1/gateways", token or relay.admin_token, {"name": name})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_gateway_create_and_enroll(relay: Relay) -> None:
    gw = await new_gateway(relay)
    assert gw["id"].startswith("gw_") and gw["enrollment_token"].startswith("bhe_")
    key = GatewayKeyPair.generate()
    r = await enroll(relay, gw["enrollment_token"], key)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["gateway_id"] == gw["id"] and body["gateway_name"] == "plant"
    assert body["member_id"].startswith("mem_")

    detail = (await relay.call("GET", f"/v1/gateways/{gw['id']}", relay.admin_token)).json()
    assert detail["hpke_public_key"] == key.public_text()
    [member] = detail["members"]
    assert member["id"] == body["member_id"]
    assert member["online"] is False and member["rtt_ms"] is None and member["inflight"] == 0
    assert member["revoked"] is False and member["hostname"] == "agent-1.corp.example"

    raw = relay.db_bytes()
    assert gw["enrollment_token"].encode() not in raw
    assert gw["enrollment_token"][4:].encode() not in raw


async def test_enrollment_token_cannot_be_reused(relay: Relay) -> None:
    gw = await new_gateway(relay)
    assert (await enroll(relay, gw["enrollment_token"])).status_code == 201
    body = assert_problem(await enroll(relay, gw["enrollment_token"]), 401)
    assert "already used" in body["detail"]


async def test_enrollment_race_admits_one(relay: Relay) -> None:
    gw = await new_gateway(relay)
    key = GatewayKeyPair.generate()
    results = await asyncio.gather(
        *(enroll(relay, gw["enrollment_token"], key, name=f"a{i}") for i in range(5))
    )
    assert sorted(r.status_code for r in results) == [201, 401, 401, 401, 401]
    detail = (await relay.call("GET", f"/v1/gateways/{gw['id']}", relay.admin_token)).json()
    assert len(detail["members"]) == 1


async def test_unknown_token(relay: Relay) -> None:
    for token in ("bhe_doesnotexist", "nonsense"):
        body = assert_problem(await enroll(relay, token), 401)
        assert "unknown" in body["detail"]


async def test_expired_token(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await new_gateway(relay)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1, seconds=1)
    monkeypatch.setattr(enroll_module, "utcnow", lambda: later)
    body = assert_problem(await enroll(relay, gw["enrollment_token"]), 401)
    assert "expired" in body["detail"]
    monkeypatch.undo()
    assert (await enroll(relay, gw["enrollment_token"])).status_code == 201


async def test_bad_keys_are_422_and_do_not_burn_the_token(relay: Relay) -> None:
    gw = await new_gateway(relay)
    payload = {
        "token": gw["enrollment_token"],
        "name": "a",
        "hostname": "h",
        "version": "0.1.0",
        "signing_public_key": "AAAA",
        "hpke_public_key": GatewayKeyPair.generate().public_text(),
    }
    body = assert_problem(await relay.call("POST", "/v1/enroll", json=payload), 422)
    assert "signing_public_key" in body["detail"]
    payload |= {"signing_public_key": signing_key_text(), "hpke_public_key": "AAAA"}
    body = assert_problem(await relay.call("POST", "/v1/enroll", json=payload), 422)
    assert "hpke_public_key" in body["detail"]
    assert (await enroll(relay, gw["enrollment_token"])).status_code == 201


async def test_second_member_must_share_the_gateway_key(relay: Relay) -> None:
    gw = await new_gateway(relay)
    key = GatewayKeyPair.generate()
    assert (await enroll(relay, gw["enrollment_token"], key)).status_code == 201
    r = await relay.call("POST", f"/v1/gateways/{gw['id']}/enrollment-tokens", relay.admin_token)
    assert r.status_code == 201
    second = r.json()["enrollment_token"]
    body = assert_problem(await enroll(relay, second, GatewayKeyPair.generate(), "b"), 409)
    assert "existing key" in body["detail"]
    r = await enroll(relay, second, key, "b")
    assert r.status_code == 201, "a refused join must leave the token usable"


async def test_gateways_are_visible_to_owner_and_admins(relay: Relay) -> None:
    alice = await relay.user("alice")
    bob = await relay.user("bob")
    gw = await new_gateway(relay, alice["token"], "alice-gw")
    assert [g["id"] for g in (await relay.call("GET", "/v1/gateways", alice["token"])).json()] == [
        gw["id"]
    ]
    assert (await relay.call("GET", "/v1/gateways", bob["token"])).json() == []
    assert_problem(await relay.call("GET", f"/v1/gateways/{gw['id']}", bob["token"]), 404)
    r = await relay.call("POST", f"/v1/gateways/{gw['id']}/enrollment-tokens", bob["token"])
    assert_problem(r, 404)
    admin_view = await relay.call("GET", "/v1/gateways", relay.admin_token)
    assert gw["id"] in [g["id"] for g in admin_view.json()]


async def test_revoke_member_disconnects(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await new_gateway(relay)
    member_id = (await enroll(relay, gw["enrollment_token"])).json()["member_id"]
    calls: list[tuple[str, str]] = []

    async def disconnect(mid: str, reason: str) -> None:
        calls.append((mid, reason))

    monkeypatch.setattr(relay.app.state.hub, "disconnect", disconnect)
    url = f"/v1/gateways/{gw['id']}/members/{member_id}"
    assert (await relay.call("DELETE", url, relay.admin_token)).status_code == 204
    assert calls == [(member_id, "member revoked")]
    detail = (await relay.call("GET", f"/v1/gateways/{gw['id']}", relay.admin_token)).json()
    assert detail["members"][0]["revoked"] is True
    assert_problem(
        await relay.call("DELETE", f"/v1/gateways/{gw['id']}/members/mem_x", relay.admin_token),
        404,
    )


async def test_live_member_fields_come_from_the_hub(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await new_gateway(relay)
    member_id = (await enroll(relay, gw["enrollment_token"])).json()["member_id"]

    class Live:
        version = "9.9.9"
        rtt_ms = 12.5
        inflight = 3
        total = 42
        session_id = "ses_1"
        connected_at = 0.0
        draining = False
        cpu = 12.0
        memory = 34.0

    monkeypatch.setattr(
        relay.app.state.hub, "live", lambda mid: Live() if mid == member_id else None
    )
    detail = (await relay.call("GET", f"/v1/gateways/{gw['id']}", relay.admin_token)).json()
    m = detail["members"][0]
    assert (m["online"], m["version"], m["rtt_ms"], m["inflight"], m["total"], m["session_id"]) == (
        True,
        "9.9.9",
        12.5,
        3,
        42,
        "ses_1",
    )
