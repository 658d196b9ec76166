"""Importing custom connector definitions: every auth scheme, messy files, refusals."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from backhaul.seal import open_sealed
from relay import plan
from relay.importer import DefinitionError, ImportRequest, import_definition
from relay.oauth import providers
from relay.store import queries
from tests.relay.connector_files import import_body, text
from tests.relay.online_helpers import online_config
from tests.relay.relay_helpers import Relay, assert_problem, gateway_with_member, start

# fixture -> (auth_type, identity_provider, parameter names, needs a gateway)
EXPECTED: dict[str, tuple[str, str | None, list[str], bool]] = {
    "none": ("none", None, [], False),
    "basic": ("basic", None, ["username", "password"], False),
    "apikey-header": ("api_key", None, ["api_key"], False),
    "apikey-query": ("api_key", None, ["functionKey"], False),
    "oauth2-generic": ("oauth2", "oauth2", [], False),
    "oauth2-aad": ("oauth2", "aad", ["token:TenantId"], False),
    "oauth2-microsoftaccount": ("oauth2", "microsoftaccount", [], False),
    "windows-gateway": ("windows", None, ["username", "password"], True),
    "policies": ("none", None, ["host", "region"], False),
    "multi-auth": ("api_key", None, ["api_key"], False),
    "openapi3": ("api_key", None, ["api_key"], False),
    "messy": ("api_key", None, ["subscription_key", "tenant"], False),
}


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    async for r in start(online_config(tmp_path / "data")):
        yield r


async def do_import(relay: Relay, body: dict[str, Any], token: str | None = None) -> Any:
    return await relay.call("POST", "/v1/connectors/import", token or relay.admin_token, body)


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_each_fixture_imports_and_says_what_a_connection_needs(
    relay: Relay, name: str
) -> None:
    auth, provider, params, needs_gateway = EXPECTED[name]
    body = import_body(name)
    if needs_gateway:
        body["gateway_id"] = (await gateway_with_member(relay, relay.admin_token)).gateway_id
    r = await do_import(relay, body)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert {"id", "auth_type", "parameters", "warnings"} <= doc.keys()
    assert doc["id"].startswith("ctr_")
    assert doc["auth_type"] == auth
    assert doc.get("identity_provider") == provider
    assert [p["name"] for p in doc["parameters"]] == params
    assert all(isinstance(w, str) for w in doc["warnings"])
    got = (await relay.call("GET", f"/v1/connectors/{doc['id']}", relay.admin_token)).json()
    assert got["auth_type"] == auth and got["source"] in ("openapi2", "openapi3")
    assert got["base_url"] == doc["base_url"]


async def test_basic_parameters_are_marked_with_their_use(relay: Relay) -> None:
    doc = (await do_import(relay, import_body("basic"))).json()
    used = {p["name"]: (p["used_for"], p["secret"], p["required"]) for p in doc["parameters"]}
    assert used == {"username": ("username", True, True), "password": ("password", True, True)}
    assert doc["base_url"] == "https://timesheets.example.com/"
    assert doc["warnings"] == []


async def test_api_key_header_and_query(relay: Relay) -> None:
    header = (await do_import(relay, import_body("apikey-header"))).json()
    query = (await do_import(relay, import_body("apikey-query"))).json()
    header_ctr = await relay.call("GET", f"/v1/connectors/{header['id']}", relay.admin_token)
    query_ctr = await relay.call("GET", f"/v1/connectors/{query['id']}", relay.admin_token)
    assert (header_ctr.json()["api_key_name"], header_ctr.json()["api_key_in"]) == (
        "X-Api-Key",
        "header",
    )
    assert (query_ctr.json()["api_key_name"], query_ctr.json()["api_key_in"]) == ("code", "query")
    assert query["parameters"][0]["used_for"] == "api_key"


async def test_oauth_result_names_the_redirect_url(relay: Relay) -> None:
    doc = (await do_import(relay, import_body("oauth2-generic"))).json()
    assert doc["redirect_url"] == "https://relay.test/v1/oauth/callback"
    assert doc["gateway_id"] is None


async def test_github_needs_a_client_id_the_file_only_has_a_placeholder(relay: Relay) -> None:
    problem = assert_problem(await do_import(relay, import_body("oauth2-github")), 422)
    assert "clientId" in problem["detail"]
    r = await do_import(relay, import_body("oauth2-github", oauth={"client_id": "gh-app"}))
    assert r.status_code == 201, r.text
    assert r.json()["identity_provider"] == "github"


async def test_windows_needs_a_gateway_and_oauth_refuses_one(relay: Relay) -> None:
    problem = assert_problem(await do_import(relay, import_body("windows-gateway")), 422)
    assert "gateway" in problem["detail"]
    gw = await gateway_with_member(relay, relay.admin_token)
    body = import_body("oauth2-generic", gateway_id=gw.gateway_id)
    problem = assert_problem(await do_import(relay, body), 422)
    assert "online" in problem["detail"]


async def test_windows_connection_from_an_imported_definition(relay: Relay) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    body = import_body("windows-gateway", gateway_id=gw.gateway_id)
    ctr = (await do_import(relay, body)).json()
    params = {"username": "CORP\\svc-hr", "password": "Winter-2025-secret"}
    r = await relay.call(
        "POST",
        "/v1/connections",
        relay.admin_token,
        {"connector_id": ctr["id"], "parameters": params},
    )
    assert r.status_code == 201, r.text
    cxn = r.json()
    assert cxn["parameters"] == {}  # both values are credentials: sealed, not stored in clear
    async with relay.app.state.db() as session:
        target = await queries.invoke_target(session, cxn["id"], relay.admin_id, True)
        found = await plan.load(session, target)
    opened = open_sealed(
        gw.key, target.seal_suite, target.sealed_credentials, cxn["id"], target.base_url
    )
    assert opened == params
    assert found.auth_spec() == {
        "type": "windows",
        "api_key_name": None,
        "api_key_in": None,
        "windows_scheme": "negotiate",
        "spn": None,
    }
    assert b"Winter-2025-secret" not in relay.db_bytes()


async def test_unknown_gateway_is_404(relay: Relay) -> None:
    assert_problem(await do_import(relay, import_body("none", gateway_id="gw_missing")), 404)


async def test_policies_and_what_cannot_run_are_reported(relay: Relay) -> None:
    doc = (await do_import(relay, import_body("policies"))).json()
    assert doc["policies"] == [
        "dynamichosturl",
        "setheader",
        "setheader",
        "setqueryparameter",
        "routerequesttoendpoint",
    ]
    warnings = "\n".join(doc["warnings"])
    assert "'stringreplace' is not supported" in warnings
    assert "script.csx" in warnings and "GetThing" in warnings
    region = next(p for p in doc["parameters"] if p["name"] == "region")
    assert region["allowed_values"] == ["eu", "us"] and region["default"] == "eu"


async def test_script_without_script_operations_is_still_a_warning(relay: Relay) -> None:
    body = import_body("none", script="public class Script : ScriptBase {}")
    doc = (await do_import(relay, body)).json()
    assert any("script.csx" in w for w in doc["warnings"])


async def test_messy_files_import_with_warnings_never_silently(relay: Relay) -> None:
    assert text("messy", "apiProperties.json").startswith("\ufeff")
    r = await do_import(relay, import_body("messy"))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["base_url"] == "https://legacy.example.com/"
    assert doc["operations"] == 2
    assert doc["policies"] == ["setheader"]
    warnings = "\n".join(doc["warnings"])
    assert "clientCertificate".lower() in warnings.lower()
    assert "'setproperty' is not supported" in warnings
    assert "no name" in warnings
    assert "not an object" in warnings
    tenant = next(p for p in doc["parameters"] if p["name"] == "tenant")
    assert tenant["required"] is True


async def test_multi_auth_offers_every_set(relay: Relay) -> None:
    doc = (await do_import(relay, import_body("multi-auth"))).json()
    sets = {s["name"]: s for s in doc["parameter_sets"]}
    assert list(sets) == ["api-key", "oauth"]
    assert sets["api-key"]["auth_type"] == "api_key" and sets["api-key"]["allow_sharing"]
    assert sets["oauth"]["auth_type"] == "oauth2" and not sets["oauth"]["allow_sharing"]
    assert sets["oauth"]["identity_provider"] == "oauth2"


async def test_openapi3_server_variables_and_extra_servers(relay: Relay) -> None:
    doc = (await do_import(relay, import_body("openapi3"))).json()
    assert doc["base_url"] == "https://contoso.orders.example.com/api/v3/"
    assert doc["source"] == "openapi3"
    assert any("servers" in w for w in doc["warnings"])


async def test_reimport_needs_edit_rights(relay: Relay) -> None:
    alice = await relay.user("alice")
    bob = await relay.user("bob")
    doc = (await do_import(relay, import_body("none"), alice["token"])).json()
    path = f"/v1/connectors/{doc['id']}/import"
    assert_problem(await relay.call("PUT", path, bob["token"], import_body("basic")), 404)
    share = {"user_id": bob["id"], "role": "can_use"}
    await relay.call("POST", f"/v1/connectors/{doc['id']}/shares", alice["token"], share)
    assert_problem(await relay.call("PUT", path, bob["token"], import_body("basic")), 403)
    share["role"] = "can_edit"
    r = await relay.call("POST", f"/v1/connectors/{doc['id']}/shares", alice["token"], share)
    assert r.status_code == 200, r.text
    r = await relay.call("PUT", path, bob["token"], import_body("basic"))
    assert r.status_code == 200, r.text
    assert r.json()["auth_type"] == "basic" and r.json()["id"] == doc["id"]


SWAGGER = {"swagger": "2.0", "host": "h.example.com", "paths": {}}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, "either"),
        ({"swagger": SWAGGER, "openapi": {"openapi": "3.0.0"}}, "either"),
        ({"swagger": {"swagger": "1.2", "host": "h"}}, "2.0"),
        ({"swagger": {"swagger": "2.0"}}, "host"),
        ({"swagger": {"swagger": "2.0", "host": "https://h.example.com"}}, "host"),
        ({"swagger": "{not json"}, "swagger: not valid JSON"),
        ({"swagger": "[1, 2]"}, "JSON object"),
        ({"openapi": {"openapi": "3.1.0", "servers": [{"url": "/api"}]}}, "relative"),
        ({"openapi": {"openapi": "3.0.0"}}, "servers"),
        ({"openapi": {"openapi": "2.0"}}, "3.x"),
        (
            {
                "openapi": {"openapi": "3.0.0", "servers": [{"url": "https://h/"}]},
                "api_properties": {},
            },
            "swagger",
        ),
        (
            {
                "openapi": {
                    "openapi": "3.0.0",
                    "servers": [{"url": "https://h/"}],
                    "components": {
                        "securitySchemes": {"c": {"type": "apiKey", "in": "cookie", "name": "s"}}
                    },
                }
            },
            "cookie",
        ),
        (
            {
                "openapi": {
                    "openapi": "3.0.0",
                    "servers": [{"url": "https://h/"}],
                    "components": {
                        "securitySchemes": {
                            "o": {
                                "type": "oauth2",
                                "flows": {"clientCredentials": {"tokenUrl": "https://t/"}},
                            }
                        }
                    },
                }
            },
            "authorizationCode",
        ),
        (
            {
                "swagger": SWAGGER
                | {"securityDefinitions": {"o": {"type": "oauth2", "flow": "implicit"}}}
            },
            "implicit",
        ),
        (
            {
                "swagger": SWAGGER,
                "api_properties": {
                    "properties": {
                        "connectionParameters": {
                            "token": {
                                "type": "oauthSetting",
                                "oAuthSettings": {"identityProvider": "dropbox", "clientId": "x"},
                            }
                        }
                    }
                },
            },
            "dropbox",
        ),
    ],
)
async def test_unimportable_definitions_are_422_naming_the_reason(
    relay: Relay, body: dict[str, Any], reason: str
) -> None:
    problem = assert_problem(await do_import(relay, body), 422)
    assert reason in problem["detail"], problem["detail"]
    assert problem["title"] == "Definition not importable"


def test_bearer_scheme_becomes_an_authorization_api_key() -> None:
    doc = {
        "openapi": "3.0.0",
        "servers": [{"url": "https://h.example.com"}],
        "components": {"securitySchemes": {"b": {"type": "http", "scheme": "bearer"}}},
    }
    imported = import_definition(ImportRequest(openapi=doc))
    first = imported.default_set
    assert (first.auth_type, first.api_key_name, first.api_key_in) == (
        "api_key",
        "Authorization",
        "header",
    )
    assert any("Bearer" in w for w in imported.settings.warnings)


def test_entra_id_endpoints_v1_with_resource_and_v2_with_scopes() -> None:
    warnings: list[str] = []
    v1 = providers.resolve(
        {
            "identityProvider": "aad",
            "clientId": "c",
            "customParameters": {
                "tenantId": {"value": "contoso"},
                "resourceUri": {"value": "https://vault.azure.net"},
                "domain_hint": {"value": "contoso.com"},
            },
        },
        "t",
        warnings=warnings,
    )
    assert v1.authorization_url == "https://login.microsoftonline.com/contoso/oauth2/authorize"
    assert v1.token_url == "https://login.microsoftonline.com/contoso/oauth2/token"
    assert v1.resource == "https://vault.azure.net"
    assert v1.authorize_params == {"domain_hint": "contoso.com"}
    v2 = providers.resolve(
        {"identityProvider": "aad", "clientId": "c", "scopes": ["User.Read"]},
        "t",
        warnings=warnings,
    )
    assert v2.authorization_url == "https://login.microsoftonline.com/common/oauth2/v2.0/authorize"
    assert v2.scopes == ["User.Read", "offline_access"] and v2.resource is None


def test_github_and_microsoft_account_endpoints() -> None:
    gh = providers.resolve({"identityProvider": "github", "clientId": "c"}, "t", warnings=[])
    assert gh.authorization_url == providers.GITHUB_AUTHORIZE
    assert gh.token_url == providers.GITHUB_TOKEN
    msa = providers.resolve(
        {"identityProvider": "microsoftaccount", "clientId": "c"}, "t", warnings=[]
    )
    assert (msa.authorization_url, msa.token_url) == (
        providers.MSA_AUTHORIZE,
        providers.MSA_TOKEN,
    )
    overridden = providers.resolve(
        {
            "identityProvider": "github",
            "clientId": "c",
            "customParameters": {
                "authorizationUrl": {"value": "https://ghe.corp.example/login/oauth/authorize"},
                "tokenUrl": {"value": "https://ghe.corp.example/login/oauth/access_token"},
            },
        },
        "t",
        warnings=[],
    )
    assert overridden.authorization_url.startswith("https://ghe.corp.example/")


# -- never a crash -----------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "swagger",
                    "host",
                    "paths",
                    "get",
                    "operationId",
                    "securityDefinitions",
                    "type",
                    "in",
                    "name",
                    "flow",
                    "properties",
                    "connectionParameters",
                    "connectionParameterSets",
                    "values",
                    "parameters",
                    "oAuthSettings",
                    "identityProvider",
                    "policyTemplateInstances",
                    "templateId",
                    "x-ms-apimTemplateParameter.name",
                    "x-ms-apimTemplateParameter.newPath",
                    "x-ms-apimTemplate-operationName",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(swagger=_json, props=_json)
# Arrays that are not arrays: once a TypeError (iterating ``true``) instead of a warning.
@example(swagger={}, props={"connectionParameterSets": {"values": True}})
@example(swagger={"schemes": True, "servers": 5, "security": 1.5}, props={})
def test_arbitrary_json_imports_or_is_refused_never_crashes(swagger: Any, props: Any) -> None:
    if isinstance(swagger, dict):
        swagger = {"swagger": "2.0", "host": "h.example.com"} | swagger
    try:
        imported = import_definition(ImportRequest(swagger=swagger, api_properties=props))
    except DefinitionError:
        return
    json.dumps(imported.settings.model_dump(mode="json"))
