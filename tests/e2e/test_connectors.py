"""Imported connectors end to end: real relay and agent processes, the admin CLI, and an
online OAuth connector against a real authorization server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.conftest import PASSWORD, World
from tests.relay.connector_files import FIXTURES
from tests.relay.oauth_server import ALICE, AuthServer, connector_definition

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def backhaul(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    env |= {
        "BACKHAUL_RELAY": world.stack.relay_url,
        "BACKHAUL_TOKEN": world.stack.admin_token,
        "BACKHAUL_CA_FILE": str(world.stack.ca_file),
    }
    return subprocess.run(
        [str(BIN / "backhaul"), *args], capture_output=True, text=True, env=env, timeout=60
    )


def invoke(world: World, connection_id: str, path: str, **kwargs: Any) -> httpx.Response:
    with world.stack.client() as client:
        response: httpx.Response = client.request(
            kwargs.pop("method", "GET"), f"/v1/connections/{connection_id}/invoke/{path}", **kwargs
        )
        return response


def test_cli_import_then_invoke_through_the_gateway(world: World, tmp_path: Path) -> None:
    folder = tmp_path / "regional-echo"
    shutil.copytree(FIXTURES / "policies", folder)
    done = backhaul(world, "connectors", "import", str(folder), "--gateway", world.gateway_id)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["auth_type"] == "none" and result["gateway_id"] == world.gateway_id
    assert "warning:" in done.stderr and "stringreplace" in done.stderr
    assert "script.csx" in done.stderr

    api = urlsplit(world.api)
    cxn = world.stack.call(
        "POST",
        "/v1/connections",
        json={"connector_id": result["id"], "parameters": {"host": api.netloc, "region": "us"}},
    )
    plain = invoke(world, cxn["id"], "echo/plain?x=1")
    assert plain.status_code == 200, plain.text
    echo = plain.json()
    assert echo["path"] == "/echo/plain"
    assert echo["args"] == {"x": ["1"], "api-version": ["2024-01-01"]}
    assert echo["headers"]["x-region"] == "us" and echo["headers"]["x-client"] == "backhaul"
    routed = invoke(world, cxn["id"], "things/5").json()
    assert (routed["method"], routed["path"]) == ("POST", "/echo/v2/us/things/5")

    doc = world.stack.call("GET", f"/v1/connections/{cxn['id']}/openapi.json")
    server = doc["servers"][0]["url"]
    assert server == f"{world.stack.relay_url}/v1/connections/{cxn['id']}/invoke"
    with httpx.Client(verify=world.stack.tls()) as client:
        r = client.get(
            server + "/echo/plain", headers={"Authorization": f"Bearer {world.stack.admin_token}"}
        )
    assert r.status_code == 200 and r.json()["headers"]["x-region"] == "us"

    listed = backhaul(world, "audit", "--json", "--action", "invoke", "--object", cxn["id"])
    assert listed.returncode == 0, listed.stderr
    events = json.loads(listed.stdout)
    assert len(events) == 3 and {e["status"] for e in events} == {200}
    assert all(e["bytes_out"] > 0 and e["result"] == "ok" for e in events), [
        (e["bytes_out"], e["result"], e["detail"]) for e in events
    ]
    table = backhaul(world, "audit", "--limit", "5")
    assert table.returncode == 0 and "invoke" in table.stdout

    user = world.stack.call("POST", "/v1/users", json={"name": "e2e-maker", "role": "user"})
    shared = backhaul(world, "connectors", "share", result["id"], user["id"], "--role", "can_edit")
    assert shared.returncode == 0, shared.stderr
    assert json.loads(shared.stdout)["role"] == "can_edit"
    seen = world.stack.call("GET", f"/v1/connectors/{result['id']}", user["token"])
    assert seen["access"] == "can_edit"


def test_cli_imports_openapi3_and_explains_what_it_cannot(world: World, tmp_path: Path) -> None:
    done = backhaul(world, "connectors", "import", str(FIXTURES / "openapi3"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"] == "openapi3"
    empty = backhaul(world, "connectors", "import", str(tmp_path))
    assert empty.returncode == 1 and "apiDefinition.swagger.json" in empty.stderr
    (tmp_path / "apiDefinition.swagger.json").write_text('{"swagger": "2.0"}')
    refused = backhaul(world, "connectors", "import", str(tmp_path))
    assert refused.returncode == 1 and "host" in refused.stderr and "422" in refused.stderr


def test_imported_basic_credentials_are_sealed_and_applied_by_the_agent(world: World) -> None:
    api = urlsplit(world.api)
    body = {
        "swagger": {
            "swagger": "2.0",
            "host": api.netloc,
            "schemes": ["http"],
            "paths": {"/basic/{x}": {"get": {"operationId": "Basic"}}},
            "securityDefinitions": {"b": {"type": "basic"}},
        },
        "api_properties": json.loads((FIXTURES / "basic" / "apiProperties.json").read_text()),
        "gateway_id": world.gateway_id,
    }
    ctr = world.stack.call("POST", "/v1/connectors/import", json=body)
    params = {"username": "alice", "password": PASSWORD}
    cxn = world.stack.call(
        "POST", "/v1/connections", json={"connector_id": ctr["id"], "parameters": params}
    )
    r = invoke(world, cxn["id"], "basic/x")
    assert r.status_code == 200, r.text
    assert r.json()["user"] == "alice"


@pytest.fixture(scope="module")
def provider() -> Iterator[AuthServer]:
    server = AuthServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_oauth_round_trip_for_an_online_connector(world: World, provider: AuthServer) -> None:
    callback = f"{world.stack.relay_url}/v1/oauth/callback"
    client = provider.register(callback, secret="e2e-client-secret")
    body = connector_definition(provider, client.client_id) | {
        "oauth": {"client_secret": "e2e-client-secret"}
    }
    result = world.stack.call("POST", "/v1/connectors/import", json=body)
    assert result["redirect_url"] == callback
    cxn = world.stack.call("POST", "/v1/connections", json={"connector_id": result["id"]})
    assert invoke(world, cxn["id"], "me").status_code == 409

    started = world.stack.call("POST", f"/v1/connections/{cxn['id']}/oauth/start")
    with httpx.Client() as browser:
        at_provider = browser.get(started["authorize_url"])
    assert at_provider.status_code == 302
    location = at_provider.headers["location"]
    assert location.startswith(callback + "?")
    with httpx.Client(verify=world.stack.tls()) as browser:
        back = browser.get(location)  # the browser carries no relay token
    assert back.status_code == 200, back.text
    assert back.json()["status"] == "connected"

    me = invoke(world, cxn["id"], "me")
    assert me.status_code == 200, me.text
    assert me.json()["user"] == ALICE
    provider.revoke_access_tokens()
    again = invoke(world, cxn["id"], "me")
    assert again.status_code == 200 and again.json()["token"] != me.json()["token"]
    assert len(provider.grants("refresh_token")) == 1
    assert me.json()["token"] not in world.stack.log_text("relay")
