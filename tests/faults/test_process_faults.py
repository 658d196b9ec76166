"""Processes dying and internal APIs that never answer: every caller gets a problem at once or
at its deadline, never a hang, and the gateway serves the next call."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backhaul.devstack import DevStack
from tests.faults.harness import (
    BACKOFF_MAX,
    DEFAULT_DEADLINE,
    MAX_DEADLINE,
    log_events,
    problem_of,
    read_response,
    relay_port,
    tls_socket,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_agent_killed_mid_request_is_a_502_problem_at_once(
    stack: DevStack, api: str, fresh_agent: tuple[str, Path, str]
) -> None:
    gateway_id, agent_dir, name = fresh_agent
    cid = stack.connection(gateway_id, api)
    # A POST (never retried elsewhere) whose body is still arriving at the internal API.
    sock = tls_socket(stack)
    head = (
        f"POST /v1/connections/{cid}/invoke/upload HTTP/1.1\r\nHost: relay\r\n"
        f"Authorization: Bearer {stack.admin_token}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 10000000\r\n\r\n"
    )
    sock.sendall(head.encode() + b"x" * 65536)
    wait_for(lambda: stack.agent_status(agent_dir).get("inflight") == 1, 10)
    killed = time.monotonic()
    stack.stop_process(name, signal.SIGKILL)
    status, headers, body = read_response(sock, timeout=10)
    elapsed = time.monotonic() - killed
    sock.close()
    assert status == 502
    assert headers["content-type"] == "application/problem+json"
    assert problem_of(body)["title"] == "Gateway member lost"
    assert elapsed < 1.0, f"the 502 took {elapsed:.2f}s"


def test_agent_killed_mid_stream_cuts_the_body_at_once(
    stack: DevStack, api: str, fresh_agent: tuple[str, Path, str]
) -> None:
    gateway_id, _, name = fresh_agent
    cid = stack.connection(gateway_id, api)
    with stack.client() as client:
        with client.stream("GET", f"/v1/connections/{cid}/invoke/drip/1000/50") as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            assert next(chunks).startswith(b"chunk 0")
            killed = time.monotonic()
            stack.stop_process(name, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):  # an incomplete chunked body
                for _ in chunks:
                    pass
            elapsed = time.monotonic() - killed
    assert elapsed < 1.0, f"the body was cut after {elapsed:.2f}s"


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An internal API that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        sock.close()


def test_an_api_that_never_answers_is_cut_at_the_deadline(
    stack: DevStack, api: str, blackhole: str
) -> None:
    gateway_id, agent_dir = stack.enroll(name="ag-deadline", allow=[api, blackhole])
    stack.start_agent(agent_dir, "ag-deadline")
    try:
        hole = stack.connection(gateway_id, blackhole)
        slow = stack.connection(gateway_id, api)
        cases = [
            (hole, "x", None, DEFAULT_DEADLINE),  # the relay's default deadline
            (hole, "x", "0.5", 0.5),  # the caller's shorter one
            (slow, "slow/60", "1000", MAX_DEADLINE),  # never beyond the relay's maximum
        ]
        with stack.client() as client:
            for cid, path, asked, expected in cases:
                headers = {"X-Backhaul-Timeout": asked} if asked else {}
                started = time.monotonic()
                response = client.get(f"/v1/connections/{cid}/invoke/{path}", headers=headers)
                elapsed = time.monotonic() - started
                assert response.status_code == 504, response.text
                assert response.headers["content-type"] == "application/problem+json"
                assert problem_of(response.content)["title"] == "Gateway timeout"
                assert expected - 0.05 <= elapsed < expected + 1.0, (asked, elapsed)
            # Nothing is left running on the agent, and it serves the next call.
            wait_for(lambda: stack.agent_status(agent_dir)["inflight"] == 0, 5)
            assert client.get(f"/v1/connections/{slow}/invoke/hello").status_code == 200
    finally:
        stack.stop_process("ag-deadline", timeout=10)


def _connected_at(stack: DevStack, name: str, after: dt.datetime) -> dt.datetime | None:
    """When agent ``name`` logged its first ``link.connected`` after ``after``."""
    for event in log_events(stack, name, "link.connected"):
        at = dt.datetime.fromisoformat(event["timestamp"])
        if at > after:
            return at
    return None


def test_relay_killed_and_restarted_every_agent_back_within_its_backoff(
    stack: DevStack, api: str
) -> None:
    agents = {}
    for index in range(3):
        name = f"ag-restart{index}"
        gateway_id, agent_dir = stack.enroll(name=name, allow=[api])
        stack.start_agent(agent_dir, name)
        agents[name] = (gateway_id, stack.connection(gateway_id, api))
    try:
        stack.stop_process("relay", signal.SIGKILL)
        killed = dt.datetime.now(dt.UTC)
        time.sleep(2.0)  # the agents notice and back off against a closed port
        stack.start_relay(relay_port(stack))
        # An agent may be back before the health check that ends start_relay has returned:
        # its connection counts from the kill on, and its delay is measured from then.
        up = dt.datetime.now(dt.UTC)
        back: dict[str, float] = {}

        def all_back() -> bool:
            for name in agents:
                at = _connected_at(stack, name, killed)
                if at is not None:
                    back[name] = (at - up).total_seconds()
            return len(back) == len(agents)

        wait_for(all_back, BACKOFF_MAX + 10, step=0.2)
        # Bound: one backoff delay (at most BACKOFF_MAX) plus connecting and the handshake.
        assert max(back.values()) < BACKOFF_MAX + 1.0, back
        with stack.client() as client:
            for gateway_id, cid in agents.values():
                member = client.get(f"/v1/gateways/{gateway_id}").json()["members"][0]
                assert member["online"] is True
                assert client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200
    finally:
        for name in agents:
            stack.stop_process(name, timeout=10)
