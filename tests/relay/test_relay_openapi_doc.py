"""The per-connection OpenAPI document, and a client driven only by that document."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backhaul import sampleapi
from tests.relay.connector_files import import_body
from tests.relay.online_helpers import online_config
from tests.relay.relay_helpers import Relay, assert_problem, start

API_KEY = "doc-test-key-17"


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    async for r in start(online_config(tmp_path / "data")):
        yield r


@pytest.fixture(scope="module")
def api() -> Iterator[sampleapi.RunningServer]:
    with sampleapi.start_in_thread(api_key=("X-Api-Key", API_KEY)) as server:
        yield server


def echo_definition(api: sampleapi.RunningServer) -> dict[str, Any]:
    return {
        "swagger": {
            "swagger": "2.0",
            "info": {"title": "Echo", "version": "7"},
            "host": f"{api.host}:{api.port}",
            "schemes": ["http"],
            "basePath": "/",
            "securityDefinitions": {"key": {"type": "apiKey", "in": "header", "name": "X-Api-Key"}},
            "paths": {
                "/echo/{word}": {
                    "parameters": [{"name": "X-Api-Key", "in": "header", "type": "string"}],
                    "get": {
                        "operationId": "Say",
                        "parameters": [
                            {"name": "word", "in": "path", "required": True, "type": "string"},
                            {"name": "loud", "in": "query", "type": "boolean"},
                        ],
                        "responses": {
                            "200": {"description": "echo", "schema": {"$ref": "#/definitions/Echo"}}
                        },
                    },
                    "post": {
                        "operationId": "Post",
                        "parameters": [
                            {"name": "word", "in": "path", "required": True, "type": "string"},
                            {
                                "name": "body",
                                "in": "body",
                                "schema": {"$ref": "#/definitions/Echo"},
                            },
                        ],
                        "responses": {"200": {"description": "echo"}},
                    },
                },
                "/apikey/check": {
                    "get": {"operationId": "Check", "responses": {"200": {"description": "ok"}}}
                },
            },
            "definitions": {"Echo": {"type": "object", "properties": {"path": {"type": "string"}}}},
        },
        "api_properties": {
            "properties": {"connectionParameters": {"api_key": {"type": "securestring"}}}
        },
    }


class DocumentClient:
    """What a generated client does: server URL + path template + the declared bearer scheme."""

    def __init__(self, doc: dict[str, Any], http: httpx.AsyncClient, token: str) -> None:
        self.doc, self.http, self.token = doc, http, token

    async def call(
        self, operation_id: str, params: dict[str, str], body: Any = None
    ) -> httpx.Response:
        for path, item in self.doc["paths"].items():
            for method, op in item.items():
                if isinstance(op, dict) and op.get("operationId") == operation_id:
                    declared = {p["name"]: p["in"] for p in op.get("parameters", [])}
                    assert set(params) <= set(declared), "the document must declare every input"
                    url = self.doc["servers"][0]["url"] + re.sub(
                        r"\{(\w+)\}", lambda m: params[m.group(1)], path
                    )
                    query = {k: v for k, v in params.items() if declared[k] == "query"}
                    (scheme,) = self.doc["security"][0]
                    assert self.doc["components"]["securitySchemes"][scheme]["scheme"] == "bearer"
                    return await self.http.request(
                        method.upper(),
                        url,
                        params=query,
                        json=body,
                        headers={"Authorization": f"Bearer {self.token}"},
                    )
        raise AssertionError(f"no operation {operation_id}")


async def test_a_client_built_from_the_document_works_unchanged(relay: Relay, api: Any) -> None:
    bob = await relay.user("bob")
    ctr = (
        await relay.call("POST", "/v1/connectors/import", relay.admin_token, echo_definition(api))
    ).json()
    body = {"connector_id": ctr["id"], "credentials": {"api_key": API_KEY}}
    cxn = (await relay.call("POST", "/v1/connections", relay.admin_token, body)).json()
    await relay.call(
        "POST", f"/v1/connections/{cxn['id']}/shares", relay.admin_token, {"user_id": bob["id"]}
    )
    r = await relay.call("GET", f"/v1/connections/{cxn['id']}/openapi.json", bob["token"])
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["openapi"].startswith("3.0") and doc["info"]["title"] == "Echo"
    assert doc["servers"] == [{"url": f"https://relay.test/v1/connections/{cxn['id']}/invoke"}]
    say = doc["paths"]["/echo/{word}"]["get"]
    assert [p["name"] for p in say["parameters"]] == ["word", "loud"]
    assert "parameters" not in doc["paths"]["/echo/{word}"]  # merged; the key is supplied
    assert say["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Echo"
    }
    post = doc["paths"]["/echo/{word}"]["post"]
    assert (
        post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        == "#/components/schemas/Echo"
    )
    assert "Echo" in doc["components"]["schemas"]

    client = DocumentClient(doc, relay.client, bob["token"])
    said = await client.call("Say", {"word": "hi", "loud": "true"})
    assert said.status_code == 200 and said.json()["path"] == "/echo/hi"
    assert said.json()["args"] == {"loud": ["true"]}
    assert said.json()["headers"]["x-api-key"] == API_KEY
    assert (await client.call("Check", {})).json()["authenticated"] is True
    posted = await client.call("Post", {"word": "w"}, body={"path": "p"})
    assert posted.json()["method"] == "POST" and posted.json()["body"] == '{"path":"p"}'


async def test_openapi3_definitions_keep_their_schemas(relay: Relay) -> None:
    ctr = (
        await relay.call(
            "POST", "/v1/connectors/import", relay.admin_token, import_body("openapi3")
        )
    ).json()
    body = {"connector_id": ctr["id"], "parameters": {"api_key": "k"}}
    cxn = (await relay.call("POST", "/v1/connections", relay.admin_token, body)).json()
    doc = (
        await relay.call("GET", f"/v1/connections/{cxn['id']}/openapi.json", relay.admin_token)
    ).json()
    op = doc["paths"]["/orders/{orderId}"]["get"]
    assert [p["name"] for p in op["parameters"]] == ["orderId"]  # subscription-key is supplied
    assert doc["components"]["schemas"]["Order"]["type"] == "object"
    assert list(doc["components"]["securitySchemes"]) == ["backhaulBearer"]
    assert doc["security"] == [{"backhaulBearer": []}]


async def test_hand_made_connectors_get_a_pass_through_document(relay: Relay) -> None:
    alice = await relay.user("alice")
    body = {"name": "raw", "base_url": "https://api.example.com/", "auth_type": "none"}
    ctr = (await relay.call("POST", "/v1/connectors", relay.admin_token, body)).json()
    cxn = (
        await relay.call("POST", "/v1/connections", relay.admin_token, {"connector_id": ctr["id"]})
    ).json()
    path = f"/v1/connections/{cxn['id']}/openapi.json"
    doc = (await relay.call("GET", path, relay.admin_token)).json()
    assert list(doc["paths"]) == ["/{path}"]
    assert_problem(await relay.call("GET", path, alice["token"]), 404)
