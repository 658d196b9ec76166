"""Connector validation and visibility."""

from __future__ import annotations

import pytest

from relay.api.connectors import normalize_base_url
from tests.relay.relay_helpers import Relay, assert_problem, gateway_with_member


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://api.corp.local", "http://api.corp.local/"),
        ("https://API.corp.local:8443/v2", "https://api.corp.local:8443/v2/"),
        ("https://api.corp.local/v2/", "https://api.corp.local/v2/"),
        ("http://10.0.0.5:8080/", "http://10.0.0.5:8080/"),
    ],
)
def test_base_url_is_normalized(url: str, expected: str) -> None:
    assert normalize_base_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://api.corp.local/",
        "api.corp.local/v1",
        "/relative",
        "https://api.corp.local/?x=1",
        "https://api.corp.local/#frag",
        "https://user:pw@api.corp.local/",
        "https:///nohost",
        "https://api.corp.local:99999/",
        "https://api corp/",
    ],
)
def test_bad_base_urls(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_base_url(url)


async def test_create_list_get_delete(relay: Relay) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    body = {
        "name": "erp",
        "base_url": "https://erp.corp.local/api",
        "auth_type": "api_key",
        "gateway_id": gw.gateway_id,
        "api_key_name": "X-Api-Key",
    }
    r = await relay.call("POST", "/v1/connectors", relay.admin_token, body)
    assert r.status_code == 201, r.text
    ctr = r.json()
    assert ctr["id"].startswith("ctr_")
    assert ctr["base_url"] == "https://erp.corp.local/api/"
    assert ctr["api_key_in"] == "header"
    listed = (await relay.call("GET", "/v1/connectors", relay.admin_token)).json()
    assert [c["id"] for c in listed] == [ctr["id"]]
    got = await relay.call("GET", f"/v1/connectors/{ctr['id']}", relay.admin_token)
    assert got.json() == ctr
    assert (
        await relay.call("DELETE", f"/v1/connectors/{ctr['id']}", relay.admin_token)
    ).status_code == 204
    assert_problem(await relay.call("GET", f"/v1/connectors/{ctr['id']}", relay.admin_token), 404)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"auth_type": "api_key"}, "api_key_name"),
        ({"auth_type": "api_key", "api_key_name": "k", "api_key_in": "cookie"}, "api_key_in"),
        ({"auth_type": "basic", "api_key_name": "k"}, "api_key_name"),
        ({"auth_type": "ntlm"}, "auth_type"),
        ({"base_url": "https://h/?q=1"}, "base_url"),
        ({"name": ""}, "name"),
    ],
)
async def test_validation_errors_name_the_field(relay: Relay, extra: dict, field: str) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    body = {"name": "x", "base_url": "https://h/", "auth_type": "none", "gateway_id": gw.gateway_id}
    body |= extra
    problem = assert_problem(
        await relay.call("POST", "/v1/connectors", relay.admin_token, body), 422
    )
    assert field in problem["detail"]


async def test_gateway_must_be_visible(relay: Relay) -> None:
    alice = await relay.user("alice")
    gw = await gateway_with_member(relay, relay.admin_token)
    body = {"name": "x", "base_url": "https://h/", "auth_type": "none", "gateway_id": gw.gateway_id}
    assert_problem(await relay.call("POST", "/v1/connectors", alice["token"], body), 404)
    body["gateway_id"] = "gw_missing"
    assert_problem(await relay.call("POST", "/v1/connectors", relay.admin_token, body), 404)


async def test_deleting_a_connector_deletes_its_connections(relay: Relay) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    bob = await relay.user("bob")
    body = {"name": "x", "base_url": "https://h/", "auth_type": "none", "gateway_id": gw.gateway_id}
    ctr = (await relay.call("POST", "/v1/connectors", relay.admin_token, body)).json()
    r = await relay.call(
        "POST", "/v1/connections", relay.admin_token, {"connector_id": ctr["id"], "credentials": {}}
    )
    assert r.status_code == 201
    cxn = r.json()["id"]
    share = {"user_id": bob["id"]}
    assert (
        await relay.call("POST", f"/v1/connections/{cxn}/shares", relay.admin_token, share)
    ).status_code == 201
    assert (
        await relay.call("DELETE", f"/v1/connectors/{ctr['id']}", relay.admin_token)
    ).status_code == 204
    assert_problem(await relay.call("GET", f"/v1/connections/{cxn}", relay.admin_token), 404)
    assert (await relay.call("GET", "/v1/connections", bob["token"])).json() == []
