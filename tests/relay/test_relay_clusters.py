"""Clusters on the relay: prepare, first member and joins, the member limit, the wrapped key,
and key rotation driven through real agent dispatchers over in-memory tunnels."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backhaul import recovery
from backhaul.keys import b64e
from backhaul.rotation import rotation_request
from backhaul.seal import GatewayKeyPair, open_sealed
from relay import rotation
from tests.relay.cluster_helpers import Member, connect, keyring_in
from tests.relay.relay_helpers import Relay, assert_problem, signing_key_text

pytestmark = pytest.mark.timeout(60)

BASE = "http://127.0.0.1:9/api/"


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    """The shared fixture, plus the dev certificate a dev relay's peer client trusts."""
    from relay.tls import generate_dev_certificate
    from tests.relay.relay_helpers import make_config, start

    tls = tmp_path / "data" / "tls"
    tls.mkdir(parents=True)
    generate_dev_certificate(tls / "relay.crt", tls / "relay.key")
    async for r in start(make_config(tmp_path / "data")):
        yield r


@pytest.fixture(scope="module")
def secret() -> tuple[recovery.RecoveryKey, str]:
    return recovery.generate()


async def new_gateway(relay: Relay, token: str | None = None, name: str = "plant") -> dict:
    r = await relay.call("POST", "/v1/gateways", token or relay.admin_token, {"name": name})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def more_token(relay: Relay, gateway_id: str) -> str:
    r = await relay.call("POST", f"/v1/gateways/{gateway_id}/enrollment-tokens", relay.admin_token)
    assert r.status_code == 201, r.text
    return str(r.json()["enrollment_token"])


def enroll_body(token: str, key: GatewayKeyPair, name: str = "m", **extra: Any) -> dict:
    return {
        "token": token,
        "name": name,
        "hostname": f"{name}.corp",
        "version": "0.1.0",
        "signing_public_key": signing_key_text(),
        "hpke_public_key": key.public_text(),
        **extra,
    }


async def prepare(relay: Relay, token: str) -> Any:
    return await relay.call("POST", "/v1/enroll/prepare", json={"token": token})


@dataclass
class Cluster:
    gateway_id: str
    key: GatewayKeyPair
    members: list[str] = field(default_factory=list)


async def first_member(
    relay: Relay, secret: recovery.RecoveryKey, owner_token: str | None = None
) -> Cluster:
    gw = await new_gateway(relay, owner_token)
    info = (await prepare(relay, gw["enrollment_token"])).json()
    key = GatewayKeyPair.generate()
    wrapped = recovery.wrap(secret, key.to_bytes(), info["gateway_id"], info["key_version"])
    r = await relay.call(
        "POST",
        "/v1/enroll",
        json=enroll_body(gw["enrollment_token"], key, "m0", wrapped_private_key=wrapped),
    )
    assert r.status_code == 201, r.text
    return Cluster(gw["id"], key, [r.json()["member_id"]])


async def join(relay: Relay, cluster: Cluster, name: str) -> str:
    token = await more_token(relay, cluster.gateway_id)
    r = await relay.call(
        "POST", "/v1/enroll", json=enroll_body(token, cluster.key, name, join=True)
    )
    assert r.status_code == 201, r.text
    member_id = str(r.json()["member_id"])
    cluster.members.append(member_id)
    return member_id


# -------------------------------------------------------------------- enrollment


async def test_prepare_describes_the_gateway_without_using_the_token(
    relay: Relay, secret: tuple[recovery.RecoveryKey, str]
) -> None:
    gw = await new_gateway(relay)
    r = await prepare(relay, gw["enrollment_token"])
    assert r.status_code == 200, r.text
    assert r.json() == {
        "gateway_id": gw["id"],
        "gateway_name": "plant",
        "hpke_public_key": None,
        "wrapped_private_key": None,
        "key_version": 1,
        "members": 0,
        "max_members": 10,
    }
    assert (await prepare(relay, gw["enrollment_token"])).status_code == 200  # still valid
    key = GatewayKeyPair.generate()
    wrapped = recovery.wrap(secret[0], key.to_bytes(), gw["id"], 1)
    r = await relay.call(
        "POST",
        "/v1/enroll",
        json=enroll_body(gw["enrollment_token"], key, wrapped_private_key=wrapped),
    )
    assert r.status_code == 201, r.text
    body = assert_problem(await prepare(relay, gw["enrollment_token"]), 401)
    assert "already used" in body["detail"]
    assert "unknown" in assert_problem(await prepare(relay, "bhe_nope"), 401)["detail"]

    info = (await prepare(relay, await more_token(relay, gw["id"]))).json()
    assert info["hpke_public_key"] == key.public_text()
    assert info["wrapped_private_key"] == wrapped and info["members"] == 1
    assert recovery.unwrap(secret[0], info["wrapped_private_key"], gw["id"], 1) == key.to_bytes()


async def test_join_rules(relay: Relay, secret: tuple[recovery.RecoveryKey, str]) -> None:
    empty = await new_gateway(relay, name="empty")
    key = GatewayKeyPair.generate()
    body = assert_problem(
        await relay.call(
            "POST", "/v1/enroll", json=enroll_body(empty["enrollment_token"], key, join=True)
        ),
        409,
    )
    assert "without --join" in body["detail"]

    cluster = await first_member(relay, secret[0])
    token = await more_token(relay, cluster.gateway_id)
    other = GatewayKeyPair.generate()
    body = assert_problem(
        await relay.call("POST", "/v1/enroll", json=enroll_body(token, other)), 409
    )
    assert "--join --recovery-key" in body["detail"]
    body = assert_problem(
        await relay.call("POST", "/v1/enroll", json=enroll_body(token, other, join=True)), 409
    )
    assert "not the gateway's current key" in body["detail"]
    wrapped = recovery.wrap(secret[0], cluster.key.to_bytes(), cluster.gateway_id, 1)
    body = assert_problem(
        await relay.call(
            "POST",
            "/v1/enroll",
            json=enroll_body(token, cluster.key, join=True, wrapped_private_key=wrapped),
        ),
        422,
    )
    assert "only the first member" in body["detail"]
    body = assert_problem(
        await relay.call(
            "POST", "/v1/enroll", json=enroll_body(token, cluster.key, join=True, key_version=2)
        ),
        409,
    )
    assert "run the enrollment again" in body["detail"]
    # Every refusal above left the token usable.
    r = await relay.call("POST", "/v1/enroll", json=enroll_body(token, cluster.key, join=True))
    assert r.status_code == 201, r.text


async def test_a_malformed_wrapped_key_is_refused(relay: Relay) -> None:
    gw = await new_gateway(relay)
    key = GatewayKeyPair.generate()
    for wrapped in ({"v": 1}, {"v": 1, "kdf": "scrypt", "n": 2**40, "r": 8, "p": 1}):
        r = await relay.call(
            "POST",
            "/v1/enroll",
            json=enroll_body(gw["enrollment_token"], key, wrapped_private_key=wrapped),
        )
        assert "wrapped_private_key" in assert_problem(r, 422)["detail"]
    assert (await prepare(relay, gw["enrollment_token"])).status_code == 200


async def test_at_most_ten_members_with_priorities(
    relay: Relay, secret: tuple[recovery.RecoveryKey, str]
) -> None:
    cluster = await first_member(relay, secret[0])
    for i in range(1, 10):
        await join(relay, cluster, f"m{i}")
    token = await more_token(relay, cluster.gateway_id)
    body = assert_problem(
        await relay.call("POST", "/v1/enroll", json=enroll_body(token, cluster.key, join=True)),
        409,
    )
    assert "10 members" in body["detail"] and "maximum" in body["detail"]
    assert (await prepare(relay, token)).json()["members"] == 10
    gw_path = f"/v1/gateways/{cluster.gateway_id}"
    r = await relay.call("DELETE", f"{gw_path}/members/{cluster.members[3]}", relay.admin_token)
    assert r.status_code == 204
    r = await relay.call("POST", "/v1/enroll", json=enroll_body(token, cluster.key, join=True))
    assert r.status_code == 201, r.text
    async with relay.app.state.db() as session:
        from relay.store.models import Member

        rows = {m.id: m.priority for m in (await session.get_one(Member, r.json()["member_id"]),)}
        assert rows[r.json()["member_id"]] == 9
        first = await session.get_one(Member, cluster.members[0])
        last = await session.get_one(Member, cluster.members[9])
        assert (first.priority, last.priority) == (0, 9)


async def test_only_the_owner_or_an_admin_reads_the_wrapped_key(
    relay: Relay, secret: tuple[recovery.RecoveryKey, str]
) -> None:
    alice = await relay.user("alice")
    bob = await relay.user("bob")
    cluster = await first_member(relay, secret[0], alice["token"])
    path = f"/v1/gateways/{cluster.gateway_id}/key"
    for token in (alice["token"], relay.admin_token):
        doc = (await relay.call("GET", path, token)).json()
        assert doc["key_version"] == 1 and doc["rotation"] is None
        assert doc["hpke_public_key"] == cluster.key.public_text()
        assert recovery.unwrap(secret[0], doc["wrapped_private_key"], cluster.gateway_id, 1)
    assert_problem(await relay.call("GET", path, bob["token"]), 404)
    r = await relay.call("POST", f"/v1/gateways/{cluster.gateway_id}/key-rotation", bob["token"])
    assert r.status_code in (404, 422)


# -------------------------------------------------------------------- rotation


@pytest.fixture
async def members(tmp_path: Path) -> AsyncIterator[list[Member]]:
    started: list[Member] = []
    yield started
    for member in started:
        await member.close()


async def connections(relay: Relay, gateway_id: str, count: int) -> list[str]:
    r = await relay.call(
        "POST",
        "/v1/connectors",
        relay.admin_token,
        {"name": "api", "base_url": BASE, "auth_type": "basic", "gateway_id": gateway_id},
    )
    assert r.status_code == 201, r.text
    connector = r.json()["id"]
    ids = []
    for i in range(count):
        creds = {"username": f"user{i}", "password": f"Secret-Pw-{i}-xyzzy"}
        r = await relay.call(
            "POST",
            "/v1/connections",
            relay.admin_token,
            {"connector_id": connector, "credentials": creds},
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def stored(relay: Relay) -> dict[str, tuple[str, bytes, int]]:
    with sqlite3.connect(relay.data_dir / "relay.db") as db:
        rows = db.execute("SELECT id, seal_suite, sealed_credentials, key_version FROM connections")
        return {row[0]: (row[1], bytes(row[2]), row[3]) for row in rows}


async def key_doc(relay: Relay, gateway_id: str) -> dict[str, Any]:
    r = await relay.call("GET", f"/v1/gateways/{gateway_id}/key", relay.admin_token)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def rotate(relay: Relay, gateway_id: str, secret: recovery.RecoveryKey) -> Any:
    body = rotation_request(await key_doc(relay, gateway_id), secret)
    return await relay.call(
        "POST", f"/v1/gateways/{gateway_id}/key-rotation", relay.admin_token, body
    )


async def test_rotation_reseals_every_connection(
    relay: Relay,
    secret: tuple[recovery.RecoveryKey, str],
    members: list[Member],
    tmp_path: Path,
) -> None:
    cluster = await first_member(relay, secret[0])
    await join(relay, cluster, "m1")
    ids = await connections(relay, cluster.gateway_id, 5)
    before = stored(relay)
    rings = [keyring_in(tmp_path / m, cluster.key) for m in cluster.members]
    for member_id, ring in zip(cluster.members, rings, strict=True):
        members.append(await connect(relay.app.state, member_id, cluster.gateway_id, ring))

    r = await rotate(relay, cluster.gateway_id, secret[0])
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["phase"] == "complete" and result["gateway_key_version"] == 2
    assert result["resealed"] == 5 and result["unopenable"] == {}
    assert sorted(result["confirmed"]) == sorted(cluster.members) and result["pending"] == []

    doc = await key_doc(relay, cluster.gateway_id)
    assert doc["key_version"] == 2 and doc["rotation"] is None  # transport deleted
    new_key = rings[0].get(2)
    assert doc["hpke_public_key"] == new_key.public_text() != cluster.key.public_text()
    assert recovery.unwrap(secret[0], doc["wrapped_private_key"], cluster.gateway_id, 2) == (
        new_key.to_bytes()
    )
    for ring in rings:
        assert ring.versions == [1, 2] and ring.get(2).to_bytes() == new_key.to_bytes()
        assert ring.version_path(2).exists()
    after = stored(relay)
    for cid in ids:
        suite, blob, version = after[cid]
        assert version == 2 and blob != before[cid][1]
        assert open_sealed(new_key, suite, blob, cid, BASE)["username"].startswith("user")
    # New connections are sealed to the new key straight away.
    [new_id] = await connections(relay, cluster.gateway_id, 1)
    assert stored(relay)[new_id][2] == 2

    # The grace period over, members forget version 1.
    await rotation._retire(relay.app.state, cluster.gateway_id, 2)
    for ring in rings:
        assert ring.versions == [2] and not ring.version_path(1).exists()

    raw = relay.db_bytes()
    for secret_bytes in (cluster.key.to_bytes(), new_key.to_bytes(), secret[0].secret):
        assert secret_bytes not in raw and b64e(secret_bytes).encode() not in raw
    assert secret[1].encode() not in raw
    assert b"Secret-Pw-" not in raw


async def test_rotation_waits_for_a_member_and_catches_up_late_ones(
    relay: Relay,
    secret: tuple[recovery.RecoveryKey, str],
    members: list[Member],
    tmp_path: Path,
) -> None:
    cluster = await first_member(relay, secret[0])
    await join(relay, cluster, "m1")
    ids = await connections(relay, cluster.gateway_id, 2)
    r = await rotate(relay, cluster.gateway_id, secret[0])
    assert r.status_code == 202, r.text
    assert r.json()["phase"] == "delivering" and r.json()["waiting_for"]
    doc = await key_doc(relay, cluster.gateway_id)
    assert doc["key_version"] == 1 and doc["rotation"]["phase"] == "delivering"
    again = await rotate(relay, cluster.gateway_id, secret[0])
    assert "already rotating" in assert_problem(again, 409)["detail"]

    ring0 = keyring_in(tmp_path / "m0", cluster.key)
    members.append(await connect(relay.app.state, cluster.members[0], cluster.gateway_id, ring0))
    doc = await until(relay, cluster.gateway_id, lambda d: d["key_version"] == 2)
    assert doc["rotation"]["phase"] == "complete"
    assert doc["rotation"]["pending"] == [cluster.members[1]]
    assert all(v[2] == 2 for k, v in stored(relay).items() if k in ids)
    body = assert_problem(await rotate(relay, cluster.gateway_id, secret[0]), 409)
    assert cluster.members[1] in body["detail"] and "revoke" in body["detail"]

    # The member that was away gets the key when it connects; then the transport goes.
    ring1 = keyring_in(tmp_path / "m1", cluster.key)
    members.append(await connect(relay.app.state, cluster.members[1], cluster.gateway_id, ring1))
    doc = await until(relay, cluster.gateway_id, lambda d: d["rotation"] is None)
    assert ring1.versions == [1, 2]
    r = await rotate(relay, cluster.gateway_id, secret[0])
    assert r.status_code == 200, r.text
    assert ring0.versions == ring1.versions == [1, 2, 3]


async def test_a_member_joining_mid_rotation_is_handed_the_new_key(
    relay: Relay,
    secret: tuple[recovery.RecoveryKey, str],
    members: list[Member],
    tmp_path: Path,
) -> None:
    cluster = await first_member(relay, secret[0])
    assert (await rotate(relay, cluster.gateway_id, secret[0])).status_code == 202
    member_id = await join(relay, cluster, "late")  # joined with version 1 from prepare
    ring = keyring_in(tmp_path / "late", cluster.key)
    members.append(await connect(relay.app.state, member_id, cluster.gateway_id, ring))
    await until(relay, cluster.gateway_id, lambda d: d["key_version"] == 2)
    assert ring.versions == [1, 2]


async def test_a_forged_transport_changes_nothing(
    relay: Relay,
    secret: tuple[recovery.RecoveryKey, str],
    members: list[Member],
    tmp_path: Path,
) -> None:
    """A relay (or anyone with an API token) that knows only the public key cannot make
    members accept a key of its choosing."""
    cluster = await first_member(relay, secret[0])
    ids = await connections(relay, cluster.gateway_id, 1)
    before = stored(relay)
    ring = keyring_in(tmp_path / "m0", cluster.key)
    members.append(await connect(relay.app.state, cluster.members[0], cluster.gateway_id, ring))
    body = rotation_request(await key_doc(relay, cluster.gateway_id), secret[0])
    body["transport"], body["hpke_public_key"] = forged_transport(
        cluster.key.public_text(), cluster.gateway_id
    )
    r = await relay.call(
        "POST", f"/v1/gateways/{cluster.gateway_id}/key-rotation", relay.admin_token, body
    )
    assert "nothing was changed" in assert_problem(r, 422)["detail"]
    doc = await key_doc(relay, cluster.gateway_id)
    assert doc["key_version"] == 1 and doc["rotation"] is None
    assert doc["hpke_public_key"] == cluster.key.public_text()
    assert ring.versions == [1] and stored(relay) == before and ids


async def test_rotation_request_checks(
    relay: Relay, secret: tuple[recovery.RecoveryKey, str]
) -> None:
    cluster = await first_member(relay, secret[0])
    body = rotation_request(await key_doc(relay, cluster.gateway_id), secret[0])
    path = f"/v1/gateways/{cluster.gateway_id}/key-rotation"
    r = await relay.call("POST", path, relay.admin_token, body | {"key_version": 3})
    assert "must announce version 2" in assert_problem(r, 409)["detail"]
    r = await relay.call(
        "POST", path, relay.admin_token, body | {"hpke_public_key": cluster.key.public_text()}
    )
    assert "current key" in assert_problem(r, 422)["detail"]
    r = await relay.call("POST", path, relay.admin_token, body | {"wrapped_private_key": {}})
    assert "wrapped_private_key" in assert_problem(r, 422)["detail"]
    r = await relay.call("POST", path, relay.admin_token, body | {"transport": "!!"})
    assert "transport" in assert_problem(r, 422)["detail"]
    empty = await new_gateway(relay, name="keyless")
    r = await relay.call(
        "POST", f"/v1/gateways/{empty['id']}/key-rotation", relay.admin_token, body
    )
    assert "no member yet" in assert_problem(r, 409)["detail"]


def forged_transport(public_key: str, gateway_id: str) -> tuple[str, str]:
    """What someone who knows only the public key can make: a key pair of its own, sealed
    right, with a proof it cannot compute. (transport, the key it announces)."""
    from backhaul import rotation as handover

    own = GatewayKeyPair.generate()
    doc = {"private_key": b64e(own.to_bytes()), "proof": b64e(b"\0" * 32)}
    info = handover._info(gateway_id, 1, 2)
    return b64e(handover.seal_to(public_key, info, json.dumps(doc).encode())), own.public_text()


async def until(relay: Relay, gateway_id: str, check: Any, timeout: float = 10) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            doc = await key_doc(relay, gateway_id)
            if check(doc):
                return doc
            await asyncio.sleep(0.05)
