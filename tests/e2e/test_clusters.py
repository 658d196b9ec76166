"""Clusters with real processes: a recovery key, a member that joins with it, the member
limit, either member serving the same sealed credentials, and a key rotation that re-seals
every connection while the relay never holds a private key or the recovery key."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.keyring import Keyring
from backhaul import recovery
from backhaul.devstack import DevStack, StackError, command
from backhaul.keys import b64e
from tests.e2e.conftest import FAST_ENV
from tests.relay.relay_helpers import signing_key_text

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PASSWORD = "Cluster-Secret-Pw-5e1f"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[DevStack]:
    with DevStack(tmp_path, env=FAST_ENV) as s:
        s.start_relay()
        s.create_admin()
        yield s


def online(stack: DevStack, gateway_id: str) -> set[str]:
    doc = stack.call("GET", f"/v1/gateways/{gateway_id}")
    return {m["name"] for m in doc["members"] if m["online"]}


def wait_online(stack: DevStack, gateway_id: str, names: set[str]) -> None:
    deadline = time.monotonic() + 20
    while online(stack, gateway_id) != names:
        assert time.monotonic() < deadline, online(stack, gateway_id)
        time.sleep(0.05)


def sealed_rows(stack: DevStack) -> dict[str, tuple[bytes, int]]:
    with sqlite3.connect(stack.relay_dir / "relay.db") as db:
        rows = db.execute("SELECT id, sealed_credentials, key_version FROM connections")
        return {r[0]: (bytes(r[1]), r[2]) for r in rows}


def relay_db_bytes(stack: DevStack) -> bytes:
    return b"".join(p.read_bytes() for p in stack.relay_dir.glob("relay.db*"))


def test_cluster_join_failover_and_key_rotation(stack: DevStack) -> None:
    api = stack.start_api(basic=("alice", PASSWORD))

    # First member: no --recovery-key, so one is generated and printed once.
    gateway_id, dir_a = stack.enroll(name="a", allow=[api])
    key_text = stack.recovery_keys[gateway_id]
    assert key_text.startswith("bhrk_")

    # A wrong recovery key: a clear error, nothing written, and the token still works.
    token = stack.call("POST", f"/v1/gateways/{gateway_id}/enrollment-tokens")["enrollment_token"]
    wrong = recovery.generate()[1]
    with pytest.raises(StackError, match="wrong recovery key") as info:
        stack.enroll(gateway_id, name="b", allow=[api], recovery_key=wrong, token=token)
    assert "token is still valid" in str(info.value)
    assert not (stack.root / "b" / "agent.toml").exists()
    _, dir_b = stack.enroll(gateway_id, name="b", allow=[api], token=token)

    # Up to ten members: fill the gateway through the API, then an eleventh is refused.
    public = stack.call("GET", f"/v1/gateways/{gateway_id}/key")["hpke_public_key"]
    fillers = []
    for i in range(8):
        token = stack.call("POST", f"/v1/gateways/{gateway_id}/enrollment-tokens")[
            "enrollment_token"
        ]
        body = {
            "token": token,
            "name": f"filler{i}",
            "hostname": "filler",
            "version": "0.1.0",
            "signing_public_key": signing_key_text(),
            "hpke_public_key": public,
            "join": True,
        }
        with httpx.Client(verify=stack.tls()) as client:
            r = client.post(f"{stack.relay_url}/v1/enroll", json=body)
        assert r.status_code == 201, r.text
        fillers.append(r.json()["member_id"])
    with pytest.raises(StackError, match="10 members") as info:
        stack.enroll(gateway_id, name="k", allow=[api])
    assert "maximum" in str(info.value)
    for member_id in fillers:
        stack.call("DELETE", f"/v1/gateways/{gateway_id}/members/{member_id}")

    # Both members open the same connection's credentials.
    cid = stack.connection(gateway_id, api, "basic", {"username": "alice", "password": PASSWORD})
    stack.start_agent(dir_a)
    stack.start_agent(dir_b)
    wait_online(stack, gateway_id, {"a", "b"})

    def each_member_serves() -> None:
        with stack.client() as client:
            for down, up in (("a", "b"), ("b", "a")):
                stack.stop_process(down)
                wait_online(stack, gateway_id, {up})
                r = client.get(f"/v1/connections/{cid}/invoke/basic/x")
                assert r.status_code == 200, (down, r.text)
                assert r.json()["user"] == "alice"
                stack.start_agent(dir_a if down == "a" else dir_b)
                wait_online(stack, gateway_id, {"a", "b"})

    each_member_serves()

    # Rotate: the admin CLI unwraps locally, members re-seal every connection.
    before = sealed_rows(stack)
    assert before[cid][1] == 1

    def rotate_key(recovery_key: str) -> subprocess.CompletedProcess[bytes]:
        argv = [command("backhaul"), "--relay", stack.relay_url, "--token", stack.admin_token]
        argv += ["--ca-file", str(stack.ca_file), "gateways", "rotate-key", gateway_id]
        return subprocess.run(
            [*argv, "--recovery-key", recovery_key], capture_output=True, timeout=60
        )

    done = rotate_key(wrong)
    assert done.returncode == 1 and b"wrong recovery key" in done.stderr
    assert sealed_rows(stack) == before
    done = rotate_key(key_text)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["phase"] == "complete" and result["gateway_key_version"] == 2
    assert result["resealed"] == 1 and sorted(result["pending"]) == []
    after = sealed_rows(stack)
    assert after[cid][1] == 2 and after[cid][0] != before[cid][0]
    assert stack.call("GET", f"/v1/gateways/{gateway_id}/key")["key_version"] == 2

    rings = [Keyring.load(d / "keys" / "gateway.key") for d in (dir_a, dir_b)]
    assert [r.versions for r in rings] == [[1, 2], [1, 2]]
    each_member_serves()

    # The relay's database never held a private key or the recovery key in clear.
    raw = relay_db_bytes(stack)
    secret = recovery.parse(key_text).secret
    for ring in rings:
        for version in ring.versions:
            private = ring.get(version).to_bytes()
            assert private not in raw and b64e(private).encode() not in raw
    assert secret not in raw and b64e(secret).encode() not in raw
    assert key_text.encode() not in raw and PASSWORD.encode() not in raw
    # Nor did any file any process wrote (configs and logs included).
    for path in stack.root.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert key_text.encode() not in path.read_bytes(), path
