"""End-to-end fixtures: real relay and agent processes over TLS, the real sample API."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backhaul.devstack import DevStack

PASSWORD = "Pa55-e2e-correct-horse"
API_KEY = "key-e2e-4242-battery-staple"

#: Short intervals so RTT shows up and dead tunnels are noticed within the test's patience.
FAST_ENV = {
    "BACKHAUL_RELAY_PING_INTERVAL_SECONDS": "1",
    "BACKHAUL_AGENT_TUNNEL__PING_INTERVAL_SECONDS": "1",
    "BACKHAUL_AGENT_TUNNEL__PING_TIMEOUT_SECONDS": "5",
    "BACKHAUL_AGENT_TUNNEL__BACKOFF_MAX_SECONDS": "2",
    "BACKHAUL_AGENT_TUNNEL__SHUTDOWN_GRACE_SECONDS": "10",
    # Online connectors: the relay's key for OAuth tokens, and loopback test servers allowed.
    "BACKHAUL_RELAY_SECRET_KEY": "e2e-relay-secret-key-0123456789abcdefghij",
    "BACKHAUL_RELAY_ONLINE_ALLOW_PRIVATE_NETWORKS": "true",
}

#: ``BACKHAUL_TEST_BUILD=build/compiled`` (``make test`` sets it for a second pass) runs the
#: relay and agent processes from that tree: the mypyc build of setup.py.
BUILD_UNDER_TEST = os.environ.get("BACKHAUL_TEST_BUILD", "")
if BUILD_UNDER_TEST:
    FAST_ENV["PYTHONPATH"] = str(Path(BUILD_UNDER_TEST).resolve())


@dataclass
class World:
    stack: DevStack
    api: str
    gateway_id: str
    agent_dir: Path
    none_id: str
    basic_id: str
    header_key_id: str
    query_key_id: str


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("e2e")
    with DevStack(root, env=FAST_ENV) as stack:
        stack.start_relay()
        stack.create_admin()
        api = stack.start_api(basic=("alice", PASSWORD), api_key=("X-Api-Key", API_KEY))
        gateway_id, agent_dir = stack.enroll(name="agent1", allow=[api])
        stack.start_agent(agent_dir)
        yield World(
            stack=stack,
            api=api,
            gateway_id=gateway_id,
            agent_dir=agent_dir,
            none_id=stack.connection(gateway_id, api),
            basic_id=stack.connection(
                gateway_id, api, "basic", {"username": "alice", "password": PASSWORD}
            ),
            header_key_id=stack.connection(
                gateway_id,
                api,
                "api_key",
                {"api_key": API_KEY},
                api_key_name="X-Api-Key",
                api_key_in="header",
            ),
            query_key_id=stack.connection(
                gateway_id,
                api,
                "api_key",
                {"api_key": API_KEY},
                api_key_name="X-Api-Key",
                api_key_in="query",
            ),
        )
