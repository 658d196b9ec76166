"""Sharing rules for connectors and connections, and the audit log that records them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from backhaul import sampleapi
from relay import audit
from tests.relay.connector_files import import_body
from tests.relay.online_helpers import online_config
from tests.relay.relay_helpers import Relay, assert_problem, gateway_with_member, start


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    async for r in start(online_config(tmp_path / "data")):
        yield r


@pytest.fixture(scope="module")
def api() -> Iterator[sampleapi.RunningServer]:
    with sampleapi.start_in_thread() as server:
        yield server


async def users(relay: Relay, *names: str) -> dict[str, dict[str, Any]]:
    return {name: await relay.user(name) for name in names}


async def imported_basic(relay: Relay, token: str) -> dict[str, Any]:
    gw = await gateway_with_member(relay, token)
    body = import_body("basic", gateway_id=gw.gateway_id)
    r = await relay.call("POST", "/v1/connectors/import", token, body)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def connect(relay: Relay, token: str, connector_id: str, **params: Any) -> Any:
    body = {"connector_id": connector_id, "parameters": params}
    return await relay.call("POST", "/v1/connections", token, body)


async def invoke(relay: Relay, token: str, connection_id: str, path: str = "hello") -> Any:
    return await relay.client.get(
        f"/v1/connections/{connection_id}/invoke/{path}", headers=relay.auth(token)
    )


async def test_connector_roles(relay: Relay) -> None:
    u = await users(relay, "alice", "bob", "carol", "dave", "erin")
    alice, bob, carol, dave, erin = (
        u[n]["token"] for n in ("alice", "bob", "carol", "dave", "erin")
    )
    ctr = await imported_basic(relay, alice)
    shares = f"/v1/connectors/{ctr['id']}/shares"
    creds = {"username": "bob", "password": "bobs-own-secret"}

    assert_problem(await relay.call("GET", f"/v1/connectors/{ctr['id']}", bob), 404)
    assert_problem(await connect(relay, bob, ctr["id"], **creds), 404)

    r = await relay.call("POST", shares, alice, {"user_id": u["bob"]["id"], "role": "can_use"})
    assert r.status_code == 201 and r.json()["role"] == "can_use"
    listed = (await relay.call("GET", "/v1/connectors", bob)).json()
    assert [(c["id"], c["access"]) for c in listed] == [(ctr["id"], "can_use")]
    assert (await connect(relay, bob, ctr["id"], **creds)).status_code == 201
    assert_problem(
        await relay.call("POST", shares, bob, {"user_id": u["carol"]["id"], "role": "can_use"}),
        403,
    )
    assert_problem(await relay.call("GET", shares, bob), 403)
    assert_problem(await relay.call("DELETE", f"/v1/connectors/{ctr['id']}", bob), 403)

    await relay.call(
        "POST", shares, alice, {"user_id": u["carol"]["id"], "role": "can_use_and_share"}
    )
    r = await relay.call("POST", shares, carol, {"user_id": u["dave"]["id"], "role": "can_use"})
    assert r.status_code == 201 and r.json()["granted_by"] == u["carol"]["id"]
    problem = assert_problem(
        await relay.call("POST", shares, carol, {"user_id": u["dave"]["id"], "role": "can_edit"}),
        403,
    )
    assert "can_use_and_share" in problem["detail"]
    assert {s["user_id"] for s in (await relay.call("GET", shares, carol)).json()} == {
        u["bob"]["id"],
        u["carol"]["id"],
        u["dave"]["id"],
    }
    assert (await relay.call("DELETE", f"{shares}/{u['dave']['id']}", carol)).status_code == 204
    assert_problem(await relay.call("GET", f"/v1/connectors/{ctr['id']}", dave), 404)

    await relay.call("POST", shares, alice, {"user_id": u["erin"]["id"], "role": "can_edit"})
    r = await relay.call("POST", shares, erin, {"user_id": u["dave"]["id"], "role": "can_edit"})
    assert r.status_code == 201
    assert_problem(await relay.call("DELETE", f"{shares}/{u['erin']['id']}", carol), 403)
    assert_problem(await relay.call("DELETE", f"/v1/connectors/{ctr['id']}", erin), 403)
    assert_problem(
        await relay.call("POST", shares, alice, {"user_id": u["alice"]["id"], "role": "can_use"}),
        409,
    )


async def test_connection_shares_use_the_owners_credentials_and_access_can_be_lost(
    relay: Relay,
) -> None:
    u = await users(relay, "alice", "bob", "carol")
    alice, bob, carol = (u[n]["token"] for n in ("alice", "bob", "carol"))
    ctr = await imported_basic(relay, alice)
    await relay.call(
        "POST", f"/v1/connectors/{ctr['id']}/shares", alice, {"user_id": u["bob"]["id"]}
    )
    cxn = (await connect(relay, bob, ctr["id"], username="bob", password="pw")).json()
    assert_problem(await invoke(relay, carol, cxn["id"]), 403)
    share = {"user_id": u["carol"]["id"]}
    assert_problem(
        await relay.call("POST", f"/v1/connections/{cxn['id']}/shares", carol, share), 404
    )
    r = await relay.call("POST", f"/v1/connections/{cxn['id']}/shares", bob, share)
    assert r.status_code == 201, r.text
    # Authorized: the request reaches routing, where no member of the gateway is online.
    assert assert_problem(await invoke(relay, carol, cxn["id"]), 503)["title"] == "Gateway offline"
    assert (
        await relay.call("DELETE", f"/v1/connectors/{ctr['id']}/shares/{u['bob']['id']}", alice)
    ).status_code == 204
    problem = assert_problem(await invoke(relay, carol, cxn["id"]), 403)
    assert "no longer has access" in problem["detail"]
    assert_problem(await invoke(relay, bob, cxn["id"]), 403)
    await relay.call(
        "POST", f"/v1/connectors/{ctr['id']}/shares", alice, {"user_id": u["bob"]["id"]}
    )
    assert_problem(await invoke(relay, bob, cxn["id"]), 503)


async def test_allow_sharing_false_blocks_connection_sharing(relay: Relay) -> None:
    u = await users(relay, "alice", "bob")
    alice = u["alice"]["token"]
    ctr = (
        await relay.call("POST", "/v1/connectors/import", alice, import_body("multi-auth"))
    ).json()
    keyed = (await connect(relay, alice, ctr["id"], api_key="k-123")).json()
    body = {"connector_id": ctr["id"], "parameter_set": "oauth"}
    personal = (await relay.call("POST", "/v1/connections", alice, body)).json()
    assert personal["parameter_set"] == "oauth"
    share = {"user_id": u["bob"]["id"]}
    r = await relay.call("POST", f"/v1/connections/{keyed['id']}/shares", alice, share)
    assert r.status_code == 201, r.text
    problem = assert_problem(
        await relay.call("POST", f"/v1/connections/{personal['id']}/shares", alice, share), 403
    )
    assert "allowSharing" in problem["detail"]
    body["parameter_set"] = "nope"
    assert (
        "parameter_set"
        in assert_problem(await relay.call("POST", "/v1/connections", alice, body), 422)["detail"]
    )


async def test_deleting_a_connector_takes_every_connection_with_it(relay: Relay) -> None:
    u = await users(relay, "alice", "bob")
    alice, bob = u["alice"]["token"], u["bob"]["token"]
    ctr = await imported_basic(relay, alice)
    await relay.call(
        "POST", f"/v1/connectors/{ctr['id']}/shares", alice, {"user_id": u["bob"]["id"]}
    )
    mine = (await connect(relay, alice, ctr["id"], username="a", password="p")).json()
    theirs = (await connect(relay, bob, ctr["id"], username="b", password="p")).json()
    await relay.call(
        "POST", f"/v1/connections/{mine['id']}/shares", alice, {"user_id": u["bob"]["id"]}
    )
    assert (await relay.call("DELETE", f"/v1/connectors/{ctr['id']}", alice)).status_code == 204
    for cxn in (mine, theirs):
        assert_problem(
            await relay.call("GET", f"/v1/connections/{cxn['id']}", relay.admin_token), 404
        )
    assert (await relay.call("GET", "/v1/connections", bob)).json() == []
    assert (await relay.call("GET", "/v1/connectors", bob)).json() == []


async def test_audit_log_records_shares_and_invokes_with_bytes(
    relay: Relay, api: sampleapi.RunningServer
) -> None:
    u = await users(relay, "alice", "bob")
    alice, bob = u["alice"]["token"], u["bob"]["token"]
    body = {"name": "sample", "base_url": api.url, "auth_type": "none"}
    ctr = (await relay.call("POST", "/v1/connectors", alice, body)).json()
    cxn = (await relay.call("POST", "/v1/connections", alice, {"connector_id": ctr["id"]})).json()
    share = {"user_id": u["bob"]["id"]}
    await relay.call("POST", f"/v1/connections/{cxn['id']}/shares", alice, share)
    got = await relay.client.get(
        f"/v1/connections/{cxn['id']}/invoke/bytes/1000", headers=relay.auth(bob)
    )
    assert got.status_code == 200 and len(got.content) == 1000
    up = await relay.client.post(
        f"/v1/connections/{cxn['id']}/invoke/upload", content=b"u" * 500, headers=relay.auth(alice)
    )
    assert up.json()["bytes"] == 500
    await relay.call("DELETE", f"/v1/connections/{cxn['id']}/shares/{u['bob']['id']}", alice)
    assert_problem(await invoke(relay, bob, cxn["id"]), 403)
    await audit.drain()

    assert_problem(await relay.call("GET", "/v1/audit", alice), 403)
    events = (await relay.call("GET", "/v1/audit", relay.admin_token)).json()
    actions = [(e["action"], e["actor_id"], e["result"]) for e in reversed(events)]
    assert actions == [
        ("connection.share", u["alice"]["id"], "ok"),
        ("invoke", u["bob"]["id"], "ok"),
        ("invoke", u["alice"]["id"], "ok"),
        ("connection.unshare", u["alice"]["id"], "ok"),
        ("invoke", u["bob"]["id"], "refused"),
    ]
    download, upload, refused = (e for e in reversed(events) if e["action"] == "invoke")
    assert (download["status"], download["bytes_out"], download["object_id"]) == (
        200,
        1000,
        cxn["id"],
    )
    assert download["detail"] == f"GET /v1/connections/{cxn['id']}/invoke/bytes/1000"
    assert (upload["bytes_in"], upload["status"]) == (500, 200)
    assert (refused["status"], refused["bytes_out"]) == (403, 0)
    share_event = events[-1]
    assert (
        share_event["subject_id"] == u["bob"]["id"] and share_event["object_type"] == "connection"
    )
    only = (await relay.call("GET", "/v1/audit?action=invoke&limit=2", relay.admin_token)).json()
    assert [e["id"] for e in only] == [refused["id"], upload["id"]]
    older = (
        await relay.call("GET", f"/v1/audit?action=invoke&before={upload['id']}", relay.admin_token)
    ).json()
    assert [e["id"] for e in older] == [download["id"]]
