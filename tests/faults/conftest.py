"""Fault tests: real relay, agent and sample-API processes, broken on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backhaul.devstack import DevStack
from tests.faults.harness import FAULT_ENV


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """One relay, an admin and the sample API for the package; agents are per test."""
    with DevStack(tmp_path_factory.mktemp("faults"), env=FAULT_ENV) as s:
        s.start_relay()
        s.create_admin()
        s.start_api()
        yield s


@pytest.fixture
def api(stack: DevStack) -> str:
    assert stack.api is not None
    return stack.api.url.rstrip("/") + "/"


def agent_dir_name(request: pytest.FixtureRequest) -> str:
    return "ag-" + request.node.name.removeprefix("test_")[:24]


@pytest.fixture
def fresh_agent(
    stack: DevStack, api: str, request: pytest.FixtureRequest
) -> Iterator[tuple[str, Path, str]]:
    """A gateway with one running agent of its own: (gateway id, config dir, process name)."""
    name = agent_dir_name(request)
    gateway_id, agent_dir = stack.enroll(name=name, allow=[api])
    stack.start_agent(agent_dir, name)
    try:
        yield gateway_id, agent_dir, name
    finally:
        stack.stop_process(name, timeout=10)
