"""Fixtures for the operations tests: one real relay (dev TLS, SQLite) and the sample API for
the whole directory, agents enrolled per test, and real squid instances per mode.

Every program here is a real process; ``tests/ops/setup.sh`` (run by ``make test``) installs
squid, htpasswd, chromium and systemd-analyze from Debian's packages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from backhaul.devstack import DevStack
from tests.ops.squid import Squid, available

#: Short intervals so tunnels come and go within a test's patience.
FAST_ENV = {
    "BACKHAUL_RELAY_PING_INTERVAL_SECONDS": "1",
    "BACKHAUL_AGENT_TUNNEL__PING_INTERVAL_SECONDS": "1",
    "BACKHAUL_AGENT_TUNNEL__PING_TIMEOUT_SECONDS": "5",
    "BACKHAUL_AGENT_TUNNEL__BACKOFF_INITIAL_SECONDS": "0.2",
    "BACKHAUL_AGENT_TUNNEL__BACKOFF_MAX_SECONDS": "1",
    "BACKHAUL_AGENT_TUNNEL__SHUTDOWN_GRACE_SECONDS": "2",
}


@pytest.fixture(scope="session")
def ops_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    root = tmp_path_factory.mktemp("ops")
    with DevStack(root, env=FAST_ENV) as stack:
        stack.start_relay()
        stack.create_admin()
        stack.start_api()
        yield stack


@pytest.fixture
def squid() -> Iterator[Callable[..., Squid]]:
    """``squid(mode, users=..., deny_ports=...)`` starts one; all are stopped after the test."""
    reason = available()
    if reason is not None:
        pytest.fail(reason)
    started: list[Squid] = []

    def start(mode: str = "open", **kwargs: object) -> Squid:
        proxy = Squid(mode, **kwargs)  # type: ignore[arg-type]
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
