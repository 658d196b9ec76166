"""Problem details on every error path, probes, metrics, OpenAPI, the request log."""

from __future__ import annotations

from pathlib import Path

import httpx
import structlog

from relay import metrics
from relay.app import AppState, create_app
from tests.relay.relay_helpers import Relay, assert_problem, make_config, start


async def test_unknown_route_and_method_are_problems(relay: Relay) -> None:
    assert_problem(await relay.client.get("/nope"), 404)
    assert_problem(await relay.client.put("/healthz"), 405)


async def test_malformed_json_is_a_422_problem(relay: Relay) -> None:
    r = await relay.client.post(
        "/v1/gateways",
        content=b"{not json",
        headers={**relay.auth(relay.admin_token), "content-type": "application/json"},
    )
    body = assert_problem(r, 422)
    assert body["errors"]


async def test_validation_problem_does_not_echo_input(relay: Relay) -> None:
    secret = "s3cr3t-value-that-must-not-echo"
    r = await relay.call(
        "POST", "/v1/users", relay.admin_token, {"name": secret + " !", "role": secret}
    )
    body = assert_problem(r, 422)
    assert secret not in r.text
    assert {e["field"] for e in body["errors"]} == {"name", "role"}


def test_app_state_values_are_plain_attributes_through_every_way_in() -> None:
    """The relay's ``app.state`` answers reads without State's ``__getattr__``; writes and
    deletes through attributes or items keep both copies the same."""
    state = AppState()
    state.hub = 1
    state["db"] = 2
    assert vars(state) == {"_state": {"hub": 1, "db": 2}, "hub": 1, "db": 2}
    assert (state.hub, state["hub"], state.db, len(state)) == (1, 1, 2, 2)
    assert sorted(state) == ["db", "hub"]
    del state.hub
    del state["db"]
    assert vars(state) == {"_state": {}} and getattr(state, "hub", None) is None
    try:
        state.db
    except AttributeError:
        pass
    else:
        raise AssertionError("a deleted value is still readable")


async def test_the_relays_app_state_is_an_app_state(relay: Relay) -> None:
    assert isinstance(relay.app.state, AppState) and relay.app.state.hub is not None


async def test_probes(relay: Relay) -> None:
    r = await relay.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert (await relay.client.get("/readyz")).status_code == 200


async def test_readyz_is_503_when_the_database_is_gone(relay: Relay) -> None:
    await relay.app.state.engine.dispose()
    relay.app.state.db.configure(bind=None)
    assert_problem(await relay.client.get("/readyz"), 503)


async def test_metrics_exposes_relay_series(relay: Relay) -> None:
    metrics.REQUESTS.labels(code="200").inc()
    metrics.BYTES.labels(direction="response").inc(10)
    r = await relay.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in (
        "backhaul_relay_requests_total",
        "backhaul_relay_request_seconds_bucket",
        "backhaul_relay_tunnels",
        "backhaul_relay_bytes_total",
    ):
        assert name in r.text


async def test_openapi_lists_the_contract(relay: Relay) -> None:
    doc = (await relay.client.get("/openapi.json")).json()
    for path in (
        "/v1/users",
        "/v1/users/me",
        "/v1/tokens",
        "/v1/gateways",
        "/v1/gateways/{gateway_id}",
        "/v1/gateways/{gateway_id}/enrollment-tokens",
        "/v1/gateways/{gateway_id}/members/{member_id}",
        "/v1/enroll",
        "/v1/connectors",
        "/v1/connections",
        "/v1/connections/{connection_id}/credentials",
        "/v1/connections/{connection_id}/shares",
    ):
        assert path in doc["paths"], path


async def test_request_log_has_no_query_string(relay: Relay) -> None:
    with structlog.testing.capture_logs() as logs:
        await relay.client.get("/healthz?api_key=leak-me")
    [entry] = [e for e in logs if e.get("event") == "http request"]
    assert entry["path"] == "/healthz" and entry["status"] == 200
    assert "leak-me" not in repr(logs)


async def test_data_survives_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    async for relay in start(config):
        gw = (await relay.call("POST", "/v1/gateways", relay.admin_token, {"name": "keep"})).json()
        token = relay.admin_token
    app = create_app(config)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="https://relay.test"
        ) as client:
            r = await client.get(
                f"/v1/gateways/{gw['id']}", headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 200
