"""Policy templates: the rules on their own, then applied by a relay to real requests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from backhaul import sampleapi
from backhaul.seal import open_sealed
from relay import plan, policies
from relay.importer.settings import Operation, Policy
from relay.policies import PolicyError
from relay.request_parts import RequestParts
from relay.store import queries
from tests.relay.connector_files import import_body
from tests.relay.online_helpers import online_config
from tests.relay.relay_helpers import Relay, assert_problem, gateway_with_member, start

OPS = [
    Operation(method="GET", path="/items/{id}", operation_id="GetItem"),
    Operation(method="GET", path="/items/special", operation_id="Special"),
    Operation(method="POST", path="/items", operation_id="Create"),
]


def parts(path: str = "items/7", query: str = "", headers: Any = ()) -> RequestParts:
    return RequestParts("GET", path, query, tuple(headers), "https://api.example.com/v1/")


def run(*rules: Policy, request: RequestParts | None = None, **params: Any) -> RequestParts:
    return policies.apply(
        list(rules), OPS, request or parts(), params, "/v1", host_per_request=True
    )


def test_operation_matching_prefers_the_most_literal_template() -> None:
    assert policies.match_operation(OPS, "GET", "items/7")[0] == OPS[0]
    assert policies.match_operation(OPS, "GET", "items/7")[1] == {"id": "7"}
    assert policies.match_operation(OPS, "GET", "items/special")[0] == OPS[1]
    assert policies.match_operation(OPS, "POST", "items")[0] == OPS[2]
    assert policies.match_operation(OPS, "DELETE", "items/7") == (None, {})


def test_setheader_override_skip_append() -> None:
    caller = [("x-a", "caller")]
    override = Policy(template="setheader", name="X-A", value="@connectionParameters('v')")
    assert run(override, request=parts(headers=caller), v="mine").headers == (("x-a", "mine"),)
    skip = override.model_copy(update={"exists_action": "skip"})
    assert run(skip, request=parts(headers=caller), v="mine").headers == (("x-a", "caller"),)
    assert run(skip, v="mine").headers == (("x-a", "mine"),)
    append = override.model_copy(update={"exists_action": "append"})
    assert run(append, request=parts(headers=caller), v="m").headers == (
        ("x-a", "caller"),
        ("x-a", "m"),
    )


def test_values_with_line_breaks_are_refused() -> None:
    rule = Policy(template="setheader", name="X-A", value="@connectionParameters('v')")
    with pytest.raises(PolicyError):
        run(rule, v="a\r\nInjected: yes")


def test_a_routed_method_with_a_trailing_newline_is_refused() -> None:
    rule = Policy(
        template="routerequesttoendpoint",
        new_path="/items",
        http_method="@connectionParameters('m')",
    )
    with pytest.raises(PolicyError, match="not an HTTP method"):
        run(rule, m="POST\n")


def test_setqueryparameter_and_defaults_and_other_expressions() -> None:
    rule = Policy(
        template="setqueryparameter",
        name="api-version",
        value="@connectionParameters('missing', '2024-01-01')",
    )
    out = run(rule, request=parts(query="api-version=old&x=a%20b"))
    assert out.query == "x=a%20b&api-version=2024-01-01"
    echo = Policy(
        template="setheader",
        name="X-Echo",
        value="@headers('x-in')/@queryParameters('q')/@Request.OriginalHTTPMethod/@unknown('z')",
    )
    out = run(echo, request=parts(query="q=1", headers=[("X-In", "h")]))
    assert dict(out.headers)["x-echo"] == "h/1/GET/@unknown('z')"


def test_route_uses_path_parameters_and_stays_under_the_base() -> None:
    rule = Policy(
        template="routerequesttoendpoint",
        new_path="/v2/@connectionParameters('area')/things/{id}",
        http_method="POST",
        operations=["GetItem"],
    )
    out = run(rule, area="north")
    assert (out.method, out.url) == ("POST", "https://api.example.com/v1/v2/north/things/7")
    assert run(rule, request=parts("items/special"), area="x").path == "items/special"
    with pytest.raises(PolicyError):
        run(rule, area="../..")
    with pytest.raises(PolicyError):
        run(rule.model_copy(update={"new_path": "/a/%2e%2e/b"}))


def test_dynamic_host_per_connection_and_per_operation() -> None:
    rule = Policy(
        template="dynamichosturl", url_template="https://@connectionParameters('t').example.com"
    )
    assert policies.connection_base_url([rule], {"t": "eu"}, "/v1") == "https://eu.example.com/v1/"
    scoped = rule.model_copy(update={"operations": ["GetItem"]})
    assert run(scoped, t="us").base_url == "https://us.example.com/v1/"
    assert policies.apply(
        [scoped], OPS, parts(), {"t": "us"}, "/v1", host_per_request=False
    ).base_url == ("https://api.example.com/v1/")
    with pytest.raises(PolicyError):
        policies.connection_base_url([rule], {"t": "user:pw@evil"}, "/v1")


# -- applied by a relay ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def api() -> Iterator[sampleapi.RunningServer]:
    with sampleapi.start_in_thread() as server:
        yield server


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    async for r in start(online_config(tmp_path / "data")):
        yield r


async def policies_connection(
    relay: Relay,
    api: sampleapi.RunningServer,
    region: str = "us",
    gateway_id: str | None = None,
    host: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    body = import_body("policies")
    if gateway_id is not None:
        body["gateway_id"] = gateway_id
    ctr = (await relay.call("POST", "/v1/connectors/import", relay.admin_token, body)).json()
    params = {"host": host or f"{api.host}:{api.port}", "region": region}
    r = await relay.call(
        "POST",
        "/v1/connections",
        relay.admin_token,
        {"connector_id": ctr["id"], "parameters": params},
    )
    assert r.status_code == 201, r.text
    return ctr, r.json()


async def test_online_invoke_applies_every_template(relay: Relay, api: Any) -> None:
    _, cxn = await policies_connection(relay, api)
    assert cxn["parameters"] == {"host": f"{api.host}:{api.port}", "region": "us"}
    r = await relay.client.get(
        f"/v1/connections/{cxn['id']}/invoke/echo/plain?x=1&api-version=old",
        headers=relay.auth(relay.admin_token),
    )
    assert r.status_code == 200, r.text
    echo = r.json()
    assert echo["method"] == "GET" and echo["path"] == "/echo/plain"
    assert echo["args"] == {"x": ["1"], "api-version": ["2024-01-01"]}
    assert echo["headers"]["x-region"] == "us"
    assert echo["headers"]["x-client"] == "backhaul"
    assert "authorization" not in echo["headers"]
    mine = await relay.client.get(
        f"/v1/connections/{cxn['id']}/invoke/echo/plain",
        headers=relay.auth(relay.admin_token) | {"X-Client": "mine", "X-Region": "forged"},
    )
    assert mine.json()["headers"]["x-client"] == "mine"
    assert mine.json()["headers"]["x-region"] == "us"
    routed = await relay.client.get(
        f"/v1/connections/{cxn['id']}/invoke/things/42", headers=relay.auth(relay.admin_token)
    )
    assert routed.json()["method"] == "POST"
    assert routed.json()["path"] == "/echo/v2/us/things/42"


async def test_online_redirect_to_the_apis_own_path_points_into_the_relay(
    relay: Relay, api: Any
) -> None:
    """An online connection's API redirecting under its base URL: the caller is sent to the
    same place through the relay, not to the API's own host (relay.locations)."""
    _, cxn = await policies_connection(relay, api)
    r = await relay.client.get(
        f"/v1/connections/{cxn['id']}/invoke/status/302", headers=relay.auth(relay.admin_token)
    )
    assert r.status_code == 302
    assert r.headers["location"] == f"/v1/connections/{cxn['id']}/invoke/hello"


async def test_allowed_values_and_required_parameters_are_checked(relay: Relay, api: Any) -> None:
    ctr = (
        await relay.call(
            "POST", "/v1/connectors/import", relay.admin_token, import_body("policies")
        )
    ).json()

    async def create(params: dict[str, Any]) -> Any:
        body = {"connector_id": ctr["id"], "parameters": params}
        return await relay.call("POST", "/v1/connections", relay.admin_token, body)

    problem = assert_problem(await create({"region": "eu"}), 422)
    assert "parameters.host" in problem["detail"]
    problem = assert_problem(await create({"host": "h", "region": "mars"}), 422)
    assert "region" in problem["detail"] and "mars" not in problem["detail"]
    problem = assert_problem(await create({"host": "h", "colour": "red"}), 422)
    assert "colour" in problem["detail"]
    problem = assert_problem(await create({"host": "user:pw@h"}), 422)
    assert "dynamichosturl" in problem["detail"] or "host" in problem["detail"]
    assert (await create({"host": "h.example.com"})).json()["parameters"]["region"] == "eu"


async def test_a_route_that_would_leave_the_base_is_refused(relay: Relay, api: Any) -> None:
    swagger = {
        "swagger": "2.0",
        "host": f"{api.host}:{api.port}",
        "schemes": ["http"],
        "basePath": "/echo",
        "paths": {"/x": {"get": {"operationId": "X"}}},
    }
    props = {
        "properties": {
            "connectionParameters": {"folder": {"type": "string"}},
            "policyTemplateInstances": [
                {
                    "templateId": "routerequesttoendpoint",
                    "parameters": {
                        "x-ms-apimTemplateParameter.newPath": "/@connectionParameters('folder')/x"
                    },
                }
            ],
        }
    }
    body = {"swagger": swagger, "api_properties": props}
    ctr = (await relay.call("POST", "/v1/connectors/import", relay.admin_token, body)).json()
    for folder, status in (("docs", 200), ("../status/418", 502)):
        body = {"connector_id": ctr["id"], "parameters": {"folder": folder}}
        cxn = (await relay.call("POST", "/v1/connections", relay.admin_token, body)).json()
        r = await relay.client.get(
            f"/v1/connections/{cxn['id']}/invoke/x", headers=relay.auth(relay.admin_token)
        )
        assert r.status_code == status, r.text
    assert r.json()["title"] == "Connector policy refused"


async def test_gateway_connection_is_sealed_to_the_dynamic_host(relay: Relay, api: Any) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    ctr, cxn = await policies_connection(relay, api, gateway_id=gw.gateway_id)
    async with relay.app.state.db() as session:
        target = await queries.invoke_target(session, cxn["id"], relay.admin_id, True)
    assert target.base_url == f"http://{api.host}:{api.port}/"
    assert ctr["base_url"] == "http://placeholder.example.com/"
    opened = open_sealed(
        gw.key, target.seal_suite, target.sealed_credentials, cxn["id"], target.base_url
    )
    assert opened == {}
    async with relay.app.state.db() as session:
        found = await plan.load(session, target)
    out = found.rewrite("GET", "things/9", "", [("accept", "*/*")])
    assert out.url == f"http://{api.host}:{api.port}/echo/v2/us/things/9?api-version=2024-01-01"
    assert out.method == "POST" and ("x-region", "us") in out.headers


async def test_private_destinations_are_refused_by_default(tmp_path: Path, api: Any) -> None:
    async for relay in start(online_config(tmp_path / "d", online_allow_private_networks=False)):
        _, cxn = await policies_connection(relay, api)
        r = await relay.client.get(
            f"/v1/connections/{cxn['id']}/invoke/echo/plain", headers=relay.auth(relay.admin_token)
        )
        problem = assert_problem(r, 502)
        assert "private network" in problem["detail"]


async def test_int_and_bool_parameters_are_typed_and_usable(relay: Relay, api: Any) -> None:
    swagger = {
        "swagger": "2.0",
        "host": f"{api.host}:{api.port}",
        "schemes": ["http"],
        "paths": {"/echo/x": {"get": {"operationId": "X"}}},
    }
    props = {
        "properties": {
            "connectionParameters": {
                "pageSize": {"type": "int", "uiDefinition": {"constraints": {"required": "true"}}},
                "verbose": {"type": "bool"},
            },
            "policyTemplateInstances": [
                {
                    "templateId": "setqueryparameter",
                    "parameters": {
                        "x-ms-apimTemplateParameter.name": "top",
                        "x-ms-apimTemplateParameter.value": "@connectionParameters('pageSize')",
                    },
                },
                {
                    "templateId": "setheader",
                    "parameters": {
                        "x-ms-apimTemplateParameter.name": "X-Verbose",
                        "x-ms-apimTemplateParameter.value": (
                            "@connectionParameters('verbose','false')"
                        ),
                    },
                },
            ],
        }
    }
    body = {"swagger": swagger, "api_properties": props}
    ctr = (await relay.call("POST", "/v1/connectors/import", relay.admin_token, body)).json()
    assert [(p["name"], p["type"]) for p in ctr["parameters"]] == [
        ("pageSize", "int"),
        ("verbose", "bool"),
    ]

    async def create(params: dict[str, Any]) -> Any:
        return await relay.call(
            "POST",
            "/v1/connections",
            relay.admin_token,
            {"connector_id": ctr["id"], "parameters": params},
        )

    assert "integer" in assert_problem(await create({"pageSize": "many"}), 422)["detail"]
    # Digits outside ASCII: "\u00b2" made int() raise (a 500), "\u0663" read as 3.
    for odd in ("\u00b2", "\u0663", "1_000"):
        assert "integer" in assert_problem(await create({"pageSize": odd}), 422)["detail"]
    assert (
        "true or false"
        in assert_problem(await create({"pageSize": 5, "verbose": "yes"}), 422)["detail"]
    )
    cxn = (await create({"pageSize": "25", "verbose": True})).json()
    assert cxn["parameters"] == {"pageSize": 25, "verbose": True}
    r = await relay.client.get(
        f"/v1/connections/{cxn['id']}/invoke/echo/x", headers=relay.auth(relay.admin_token)
    )
    assert r.json()["args"] == {"top": ["25"]} and r.json()["headers"]["x-verbose"] == "true"
