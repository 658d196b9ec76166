"""Invoke through real relay and agent processes: auth schemes, headers, paths, errors."""

from __future__ import annotations

import hashlib
import http.client
import ssl
from typing import Any

import pytest

from tests.e2e.conftest import PASSWORD, World

pytestmark = pytest.mark.e2e


def invoke(world: World, connection_id: str, path: str, **kwargs: object) -> object:
    with world.stack.client() as client:
        return client.request(
            str(kwargs.pop("method", "GET")),
            f"/v1/connections/{connection_id}/invoke/{path}",
            **kwargs,  # type: ignore[arg-type]
        )


def raw_get(world: World, target: str, token: str | None = None) -> tuple[int, bytes]:
    """A request whose target is sent byte for byte (httpx would normalize dot segments)."""
    host, port = world.stack.relay_url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=str(world.stack.ca_file))
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token or world.stack.admin_token}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_none_auth_reaches_the_api(world: World) -> None:
    r = invoke(world, world.none_id, "hello")
    assert r.status_code == 200
    assert r.json()["message"]


def test_basic_credentials_are_applied_by_the_agent(world: World) -> None:
    r = invoke(world, world.basic_id, "basic/anything")
    assert r.status_code == 200, r.text
    assert r.json()["user"] == "alice"


def test_basic_without_credentials_is_refused_by_the_api(world: World) -> None:
    assert invoke(world, world.none_id, "basic/anything").status_code == 401


def test_api_key_in_header_and_in_query(world: World) -> None:
    assert invoke(world, world.header_key_id, "apikey/x").status_code == 200
    assert invoke(world, world.query_key_id, "apikey/x").status_code == 200
    echoed = invoke(world, world.query_key_id, "echo/q", params={"a": "1"}).json()
    assert echoed["args"]["a"] == ["1"]
    assert "X-Api-Key" in echoed["args"]


def test_method_query_and_body_pass_through(world: World) -> None:
    r = invoke(
        world, world.none_id, "echo/a/b", method="PUT", params={"x": "y z"}, content=b"payload"
    )
    doc = r.json()
    assert (doc["method"], doc["path"], doc["body_bytes"]) == ("PUT", "/echo/a/b", 7)
    assert doc["args"] == {"x": ["y z"]}


def test_caller_authorization_cookies_and_hop_by_hop_are_not_forwarded(world: World) -> None:
    r = invoke(
        world,
        world.none_id,
        "echo/h",
        headers={
            "Cookie": "session=caller-secret",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "TE": "trailers",
            "Upgrade": "websocket",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Custom": "kept",
        },
    )
    headers = r.json()["headers"]
    assert headers.get("x-custom") == "kept"
    for name in ("authorization", "cookie", "x-drop-me", "te", "upgrade", "proxy-authorization"):
        assert name not in headers, name


def test_repeated_response_headers_survive(world: World) -> None:
    r = invoke(world, world.none_id, "status/204")
    assert r.status_code == 204


@pytest.mark.parametrize(
    "tail",
    [
        "../users",
        "a/../../x",
        "%2e%2e/x",
        "%2E%2E/x",
        ".%2e/x",
        "a%2fb",
        "a%2F..%2Fb",
        "%5c..",
        "%252e%252e/x",
    ],
)
def test_path_cannot_climb_above_the_base_path(world: World, tail: str) -> None:
    status, body = raw_get(world, f"/v1/connections/{world.none_id}/invoke/{tail}")
    assert status in (400, 404), body
    assert b"problem" in body or b"type" in body


def test_no_token_bad_token_and_foreign_connection(world: World) -> None:
    path = f"/v1/connections/{world.basic_id}/invoke/basic/x"
    with world.stack.client() as client:
        assert client.get(path, headers={"Authorization": ""}).status_code == 401
        r = client.get(path, headers={"Authorization": "Bearer bh_not-a-real-token"})
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/problem+json")
    user_id, user_token = world.stack.create_user("bob")
    with world.stack.client(user_token) as client:
        assert client.get(path).status_code == 403
    world.stack.call("POST", f"/v1/connections/{world.basic_id}/shares", json={"user_id": user_id})
    with world.stack.client(user_token) as client:
        r = client.get(path)
        assert r.status_code == 200, r.text
        assert r.json()["user"] == "alice"
    world.stack.call("DELETE", f"/v1/connections/{world.basic_id}/shares/{user_id}")
    with world.stack.client(user_token) as client:
        assert client.get(path).status_code == 403


def test_unknown_connection_is_404(world: World) -> None:
    r = invoke(world, "cxn_doesnotexist", "hello")
    assert r.status_code == 404
    assert r.json()["status"] == 404


def test_target_outside_the_allow_list_is_refused_by_the_agent(world: World) -> None:
    other = world.stack.connection(world.gateway_id, "http://127.0.0.2:9/")
    r = invoke(world, other, "x")
    assert r.status_code == 502
    assert r.json()["title"] == "Target not allowed"


def test_unreachable_api_is_502(world: World, tmp_path: object) -> None:
    from backhaul.devstack import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    # The agent's allow-list only covers the sample API: enroll a second agent allowing it.
    gateway_id, agent_dir = world.stack.enroll(name="agent-unreach", allow=[base])
    world.stack.start_agent(agent_dir)
    try:
        cid = world.stack.connection(gateway_id, base)
        r = invoke(world, cid, "x")
        assert r.status_code == 502
        assert r.json()["title"] == "Internal API unreachable"
    finally:
        world.stack.stop_process("agent-unreach")


def test_deadline_is_504(world: World) -> None:
    r = invoke(world, world.none_id, "slow/5", headers={"X-Backhaul-Timeout": "1"})
    assert r.status_code == 504
    assert r.headers["content-type"].startswith("application/problem+json")
    # The tunnel still serves everyone else.
    assert invoke(world, world.none_id, "hello").status_code == 200


def test_no_member_online_is_503(world: World) -> None:
    gateway_id, _ = world.stack.enroll(name="agent-never-started", allow=[world.api])
    cid = world.stack.connection(gateway_id, world.api)
    r = invoke(world, cid, "hello")
    assert r.status_code == 503
    assert r.json()["title"] == "Gateway offline"


def test_credentials_are_never_returned(world: World) -> None:
    doc = world.stack.call("GET", f"/v1/connections/{world.basic_id}")
    assert PASSWORD not in str(doc)


def test_answers_framed_right_on_one_kept_alive_connection(world: World) -> None:
    """Fixed-length, chunked (the API streams without a length), HEAD and no-content answers
    one after another on one connection: each framed so the next one still parses."""
    with world.stack.client() as client:
        base = f"/v1/connections/{world.none_id}/invoke"
        for _ in range(3):
            small = client.get(f"{base}/small")
            assert small.status_code == 200 and len(small.content) == 1024
            drip = client.get(f"{base}/drip/3/10")
            assert drip.status_code == 200
            assert drip.headers.get("transfer-encoding") == "chunked"
            assert drip.content
            head = client.head(f"{base}/small")
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-length"] == "1024"
            assert client.get(f"{base}/status/204").status_code == 204


def test_uploads_with_and_without_a_length_pass_through(world: World) -> None:
    """A body with Content-Length takes the relay's direct path, a chunked one the path
    that counts it as it streams: both reach the API whole."""
    body = b"0123456789" * 5000

    def chunks() -> Any:
        for i in range(0, len(body), 7000):
            yield body[i : i + 7000]

    with world.stack.client() as client:
        path = f"/v1/connections/{world.none_id}/invoke/echo/up"
        for content in (body, chunks()):
            doc = client.post(path, content=content).json()
            assert doc["body_bytes"] == len(body)
            assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_a_redirect_to_the_apis_own_path_points_into_the_relay(world: World) -> None:
    """The sample API redirects to ``/hello``: on the relay that is the connection's invoke
    path, and following it reaches the API again."""
    r = invoke(world, world.none_id, "status/302")
    assert r.status_code == 302
    location = r.headers["location"]
    assert location == f"/v1/connections/{world.none_id}/invoke/hello"
    followed = invoke(world, world.none_id, location.rsplit("/invoke/", 1)[1])
    assert followed.status_code == 200 and followed.json()["message"]
