"""The windows auth type on the relay: connector fields, connection credentials, the OPEN head,
and how an agent's Windows-auth reset reaches the caller."""

from __future__ import annotations

from typing import Any

import pytest

from backhaul.aio.tunnel import StreamError
from backhaul.seal import open_sealed
from backhaul.wire import ErrorCode
from relay.invoke import _problem_for
from relay.plan import Plan
from relay.store import queries
from tests.relay.relay_helpers import Enrolled, Relay, assert_problem, gateway_with_member

PASSWORD = "Windows-relay-pw-9!"


async def windows_connector(relay: Relay, gw: Enrolled, **fields: Any) -> dict[str, Any]:
    body = {
        "name": "intranet",
        "base_url": "https://intranet.corp.local/api",
        "auth_type": "windows",
        "gateway_id": gw.gateway_id,
    } | fields
    r = await relay.call("POST", "/v1/connectors", relay.admin_token, body)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def test_a_windows_connector_defaults_to_negotiate(relay: Relay) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    ctr = await windows_connector(relay, gw)
    assert (ctr["windows_scheme"], ctr["spn"]) == ("negotiate", None)
    ctr = await windows_connector(relay, gw, windows_scheme="kerberos", spn="HTTP/web01.corp.local")
    assert (ctr["windows_scheme"], ctr["spn"]) == ("kerberos", "HTTP/web01.corp.local")
    got = await relay.call("GET", f"/v1/connectors/{ctr['id']}", relay.admin_token)
    assert got.json()["spn"] == "HTTP/web01.corp.local"


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"windows_scheme": "digest"}, "windows_scheme"),
        ({"spn": "web01.corp.local"}, "spn"),
        ({"spn": "HTTP/web 01"}, "spn"),
        ({"spn": "HTTP/web01.corp.local\n"}, "spn"),
        ({"gateway_id": None}, "gateway"),
        ({"auth_type": "basic", "windows_scheme": "ntlm"}, "windows_scheme"),
        ({"auth_type": "none", "spn": "HTTP/x"}, "spn"),
    ],
)
async def test_windows_fields_are_checked(relay: Relay, fields: dict, words: str) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    body = {
        "name": "x",
        "base_url": "https://h/",
        "auth_type": "windows",
        "gateway_id": gw.gateway_id,
    } | fields
    problem = assert_problem(
        await relay.call("POST", "/v1/connectors", relay.admin_token, body), 422
    )
    assert words in problem["detail"]


@pytest.mark.parametrize(
    "credentials",
    [
        {"username": "CORP\\alice", "password": PASSWORD},
        {"username": "alice@CORP.LOCAL", "password": PASSWORD},
        {"identity": "service"},
    ],
)
async def test_windows_credentials_are_sealed_for_the_agent(
    relay: Relay, credentials: dict[str, str]
) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    ctr = await windows_connector(relay, gw)
    r = await relay.call(
        "POST",
        "/v1/connections",
        relay.admin_token,
        {"connector_id": ctr["id"], "credentials": credentials},
    )
    assert r.status_code == 201, r.text
    async with relay.app.state.db() as session:
        target = await queries.invoke_target(session, r.json()["id"], relay.admin_id, True)
    opened = open_sealed(
        gw.key, target.seal_suite, target.sealed_credentials, r.json()["id"], target.base_url
    )
    assert opened == credentials
    assert PASSWORD not in str(target.sealed_credentials)


@pytest.mark.parametrize(
    ("credentials", "field"),
    [
        ({"username": "CORP\\alice"}, "credentials.password"),
        ({"password": PASSWORD}, "credentials.username"),
        ({"username": "CORP\\alice", "password": ""}, "credentials.password"),
        ({"username": "CORP\\alice", "password": PASSWORD, "domain": "x"}, "credentials.domain"),
        ({"identity": "alice"}, "credentials.identity"),
        ({"identity": "service", "password": PASSWORD}, "credentials.password"),
        ({"username": "\\alice", "password": PASSWORD}, "credentials.username"),
        ({"username": 7, "password": PASSWORD}, "credentials.username"),
    ],
)
async def test_bad_windows_credentials_name_the_field_not_the_value(
    relay: Relay, credentials: dict[str, Any], field: str
) -> None:
    gw = await gateway_with_member(relay, relay.admin_token)
    ctr = await windows_connector(relay, gw)
    r = await relay.call(
        "POST",
        "/v1/connections",
        relay.admin_token,
        {"connector_id": ctr["id"], "credentials": credentials},
    )
    problem = assert_problem(r, 422)
    assert field in problem["detail"]
    assert PASSWORD not in r.text


def plan(auth_type: str, **fields: Any) -> Plan:
    return Plan(
        connection_id="cxn_1",
        connector_id="ctr_1",
        base_url="https://h/",
        auth_type=auth_type,
        api_key_name=None,
        api_key_in=None,
        settings=None,
        **fields,
    )


def test_the_open_head_carries_windows_fields_only_for_windows() -> None:
    assert plan("windows", windows_scheme="ntlm", spn="HTTP/h").auth_spec() == {
        "type": "windows",
        "api_key_name": None,
        "api_key_in": None,
        "windows_scheme": "ntlm",
        "spn": "HTTP/h",
    }
    assert plan("windows").auth_spec()["windows_scheme"] == "negotiate"
    # An agent that predates windows auth refuses unknown keys, so others never get them.
    assert set(plan("basic").auth_spec()) == {"type", "api_key_name", "api_key_in"}


def test_a_windows_auth_reset_becomes_a_problem_with_a_reason() -> None:
    exc = StreamError(
        ErrorCode.UPSTREAM_AUTH_FAILED,
        "[clock_skew] the clocks of the agent and the KDC differ by more than the realm allows",
    )
    problem = _problem_for(exc)
    assert (problem.status, problem.title) == (502, "Upstream authentication failed")
    assert problem.detail.startswith("the clocks of the agent")
    body = problem.response().body
    assert b'"reason":"clock_skew"' in body
    # Other codes keep their reason text untouched.
    other = _problem_for(StreamError(ErrorCode.UPSTREAM_ERROR, "[x] text"))
    assert other.detail == "[x] text" and other.extra == {}
