"""Invoke activity for the admin page: a minute's window per connection, bounded memory, and
the problem text of errors — recorded by the middleware, never the request itself."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from backhaul import handshake
from relay import activity
from relay.activity import Activity, Recorder


def test_window_counts_and_forgets(monkeypatch: Any) -> None:
    clock = [1000.0]
    monkeypatch.setattr(activity.time, "monotonic", lambda: clock[0])
    log = Activity()
    for status in (200, 200, 502, 404, 201):
        log.record("cxn_a", status)
    log.record("cxn_b", 503, "Gateway offline", "no member online")
    assert log.last_minute() == {"cxn_a": (5, 2), "cxn_b": (1, 1)}
    assert [e.status for e in log.errors] == [502, 404, 503]
    clock[0] += 61
    log.record("cxn_a", 200)
    assert log.last_minute() == {"cxn_a": (1, 0)}
    assert len(log.errors) == 3  # errors stay until newer ones push them out
    for _ in range(activity.MAX_ERRORS + 10):
        log.record("cxn_c", 500)
    assert len(log.errors) == activity.MAX_ERRORS


def test_the_window_keeps_counts_per_second_not_a_record_per_request(monkeypatch: Any) -> None:
    clock = [1000.2]
    monkeypatch.setattr(activity.time, "monotonic", lambda: clock[0])
    log = Activity()
    for _ in range(10_000):
        log.record("cxn_a", 200)
    log.record("cxn_b", 500)
    assert list(log._seconds) == [(1000, {"cxn_a": [10_000, 0], "cxn_b": [1, 1]})]
    clock[0] = 1030.7
    log.record("cxn_a", 404)
    assert log.last_minute() == {"cxn_a": (10_001, 1), "cxn_b": (1, 1)}
    clock[0] = 1060.9  # second 1000 ended 59.9 s ago: still in the window
    assert log.last_minute() == {"cxn_a": (10_001, 1), "cxn_b": (1, 1)}
    clock[0] = 1061.0  # and now it has left it
    assert log.last_minute() == {"cxn_a": (1, 1)}
    clock[0] = 1091.0
    assert log.last_minute() == {} and not log._seconds


async def test_recorder_sees_status_and_problem_but_nothing_else() -> None:
    log = Activity()
    problem = {"title": "Target not allowed", "detail": "no allow entry", "status": 502}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        status = 502 if scope["path"].endswith("/bad") else 200
        ctype = b"application/problem+json" if status == 502 else b"text/plain"
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]}
        )
        body = json.dumps(problem).encode() if status == 502 else b"secret response"
        await send({"type": "http.response.body", "body": body})

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    recorder = Recorder(app, log)
    for path in (
        "/v1/connections/cxn_1/invoke/ok?token=abc",
        "/v1/connections/cxn_1/invoke/bad",
        "/v1/gateways",
    ):
        await recorder({"type": "http", "path": path.split("?")[0]}, None, send)
    assert log.last_minute() == {"cxn_1": (2, 1)}
    (error,) = log.errors
    assert (error.status, error.title, error.detail) == (
        502,
        "Target not allowed",
        "no allow entry",
    )
    assert len(sent) == 6  # every message passed through unchanged


def test_probe_flag_in_the_hello() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    relay_hello = handshake.relay_hello(handshake.new_challenge())
    plain = handshake.agent_hello(relay_hello, key, "mem_1", "gw_1", "host")
    probe = handshake.agent_hello(relay_hello, key, "mem_1", "gw_1", "host", probe=True)
    assert "probe" not in plain  # unchanged for agents that serve
    assert handshake.parse_agent_hello(plain).probe is False
    assert handshake.parse_agent_hello(probe).probe is True
    assert handshake.parse_agent_hello({**plain, "probe": "yes"}).probe is False
