"""Tunnel lifecycle with real processes: status, revocation, graceful drain, reconnects."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backhaul.devstack import DevStack, command
from tests.e2e.conftest import FAST_ENV, World

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[DevStack]:
    with DevStack(tmp_path, env=FAST_ENV) as s:
        s.start_relay()
        s.create_admin()
        yield s


def _agent_status_command(world: World, *args: str) -> str:
    argv = [command("backhaul-agent"), "status", "--config-dir", str(world.agent_dir), *args]
    done = subprocess.run(argv, capture_output=True, env=world.stack.env)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def test_agent_status_json_has_every_field(world: World) -> None:
    doc = json.loads(_agent_status_command(world, "--json"))
    for field in (
        "connected",
        "relay",
        "session_id",
        "rtt_ms",
        "uptime_seconds",
        "inflight",
        "total",
        "last_error",
        "version",
    ):
        assert field in doc, field
    assert doc["connected"] is True
    assert doc["relay"] == world.stack.relay_url
    assert doc["session_id"].startswith("ses_")
    assert doc["running"] is True
    # The tests' own polling reads the same document from the status socket in-process.
    polled = world.stack.agent_status(world.agent_dir)
    assert set(polled) == set(doc) and polled["session_id"] == doc["session_id"]


def test_agent_status_table(world: World) -> None:
    table = _agent_status_command(world)
    assert re.search(r"^state\s+connected\s*$", table, re.MULTILINE), table
    assert re.search(rf"^gateway\s+{world.gateway_id}\s*$", table, re.MULTILINE), table


def test_relay_status_shows_member_online_with_rtt(world: World) -> None:
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run(
            [
                command("backhaul"),
                "--relay",
                world.stack.relay_url,
                "--token",
                world.stack.admin_token,
                "--ca-file",
                str(world.stack.ca_file),
                "status",
                "--json",
            ],
            capture_output=True,
            check=True,
        )
        doc = json.loads(out.stdout)
        gateway = next(g for g in doc["gateways"] if g["id"] == world.gateway_id)
        member = gateway["members"][0]
        if member["rtt_ms"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert member["online"] is True
    assert member["version"]
    assert member["rtt_ms"] is not None and member["rtt_ms"] >= 0
    assert "inflight" in member


def test_agent_status_when_not_running(tmp_path: Path) -> None:
    out = subprocess.run(
        [command("backhaul-agent"), "status", "--config-dir", str(tmp_path), "--json"],
        capture_output=True,
    )
    assert out.returncode != 0


def test_revoked_member_is_disconnected_and_refused(stack: DevStack) -> None:
    api = stack.start_api()
    gateway_id, agent_dir = stack.enroll(allow=[api])
    proc = stack.start_agent(agent_dir)
    cid = stack.connection(gateway_id, api)
    with stack.client() as client:
        assert client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200
        member_id = client.get(f"/v1/gateways/{gateway_id}").json()["members"][0]["id"]
        assert client.delete(f"/v1/gateways/{gateway_id}/members/{member_id}").status_code == 204
        assert client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 503
        member = client.get(f"/v1/gateways/{gateway_id}").json()["members"][0]
        assert member["online"] is False and member["revoked"] is True
    # The agent comes back, is refused before any stream, and stops retrying.
    assert proc.wait(timeout=20) != 0
    assert "member revoked" in stack.log_text("agent")


def test_sigterm_drains_in_flight_requests(stack: DevStack) -> None:
    api = stack.start_api()
    gateway_id, agent_dir = stack.enroll(allow=[api])
    stack.start_agent(agent_dir)
    cid = stack.connection(gateway_id, api)
    results: dict[str, int] = {}

    def slow_call() -> None:
        with stack.client() as client:
            results["slow"] = client.get(f"/v1/connections/{cid}/invoke/slow/2").status_code

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.7)  # the request is in flight on the agent
    assert stack.stop_process("agent", signal.SIGTERM, timeout=20) == 0
    caller.join(10)
    assert results["slow"] == 200
    with stack.client() as client:
        assert client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 503
    assert "link.draining" in stack.log_text("agent")


def test_agent_reconnects_after_relay_restart(stack: DevStack) -> None:
    api = stack.start_api()
    gateway_id, agent_dir = stack.enroll(allow=[api])
    stack.start_agent(agent_dir)
    cid = stack.connection(gateway_id, api)
    port = int(stack.relay_url.rsplit(":", 1)[1])
    first = stack.agent_status(agent_dir)["session_id"]
    stack.stop_process("relay", signal.SIGKILL)
    time.sleep(1)
    assert stack.agent_status(agent_dir)["connected"] is False
    stack.start_relay(port)
    stack.wait_connected(agent_dir, "agent", timeout=15)  # backoff is capped at 2 s here
    assert stack.agent_status(agent_dir)["session_id"] != first
    with stack.client() as client:
        assert client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200


def test_hundreds_of_streams_right_after_a_relay_restart_all_arrive(stack: DevStack) -> None:
    """The agent of the compiled build once died here (setup.py, agent/link.py): some
    hundred streams at once on a tunnel that was just re-established."""
    api = stack.start_api()
    gateway_id, agent_dir = stack.enroll(allow=[api])
    stack.env["BACKHAUL_AGENT_TUNNEL__MAX_CONCURRENT_STREAMS"] = "1000"
    stack.start_agent(agent_dir)
    cid = stack.connection(gateway_id, api)
    port = int(stack.relay_url.rsplit(":", 1)[1])
    stack.stop_process("relay", signal.SIGKILL)
    time.sleep(1)
    stack.start_relay(port)
    stack.wait_connected(agent_dir, "agent", timeout=15)

    path = f"/v1/connections/{cid}/invoke/slow/1"
    answers = asyncio.run(stack.get_many(path, 300, request_timeout=60))
    assert [getattr(r, "status_code", repr(r)) for r in answers] == [200] * 300
    assert stack.procs["agent"].poll() is None  # alive
    assert stack.agent_status(agent_dir)["connected"] is True


def test_agent_killed_mid_stream_fails_fast(stack: DevStack) -> None:
    api = stack.start_api()
    gateway_id, agent_dir = stack.enroll(allow=[api])
    stack.start_agent(agent_dir)
    cid = stack.connection(gateway_id, api)
    with stack.client() as client:
        started = time.monotonic()
        errors: list[BaseException] = []
        killer = threading.Timer(0.7, lambda: stack.stop_process("agent", signal.SIGKILL))
        killer.start()
        try:
            response = client.get(f"/v1/connections/{cid}/invoke/slow/20")
            status = response.status_code
        except httpx.HTTPError as exc:  # a streamed body may be cut instead
            errors.append(exc)
            status = 0
        killer.join()
        assert status in (502, 0), status
        assert time.monotonic() - started < 10
