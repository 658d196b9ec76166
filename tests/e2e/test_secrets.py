"""No credential, token or key in clear in the relay's database, any log, or any file the
processes wrote (configs included), after successful and failing calls alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import World

pytestmark = pytest.mark.e2e

SECRET_PASSWORD = "Unique-Secret-Pw-7d1f0c"
SECRET_KEY = "unique-api-key-3b9e55a1"


def all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file() and not p.is_socket()]


def test_no_secret_in_clear_anywhere(world: World) -> None:
    stack = world.stack
    basic = stack.connection(
        world.gateway_id, world.api, "basic", {"username": "alice", "password": SECRET_PASSWORD}
    )
    query = stack.connection(
        world.gateway_id,
        world.api,
        "api_key",
        {"api_key": SECRET_KEY},
        api_key_name="api_key",
        api_key_in="query",
    )
    header = stack.connection(
        world.gateway_id,
        world.api,
        "api_key",
        {"api_key": SECRET_KEY},
        api_key_name="X-Secret",
        api_key_in="header",
    )
    user_id, user_token = stack.create_user("carol")
    gateway = stack.call("POST", "/v1/gateways", json={"name": "unused"})
    with stack.client() as client:
        for cid in (basic, query, header):
            for path in ("basic/x", "apikey/x", "echo/x?debug=1", "status/500"):
                client.get(f"/v1/connections/{cid}/invoke/{path}")
        client.get(f"/v1/connections/{basic}/invoke/slow/3", headers={"X-Backhaul-Timeout": "0.5"})
    with stack.client(user_token) as client:
        client.get(f"/v1/connections/{basic}/invoke/basic/x")
    secrets = {
        "password": SECRET_PASSWORD.encode(),
        "api key": SECRET_KEY.encode(),
        "admin token": stack.admin_token.encode(),
        "user token": user_token.encode(),
        "enrollment token": gateway["enrollment_token"].encode(),
    }
    files = all_bytes(stack.root)
    assert any(p.name == "relay.db" for p, _ in files)
    assert any(p.suffix == ".log" for p, _ in files)
    for path, data in files:
        for label, secret in secrets.items():
            assert secret not in data, f"{label} found in clear in {path}"
    del user_id
