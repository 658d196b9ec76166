"""A half-open network: the agent's packets vanish without a FIN, an RST or an ICMP error.

The agent runs in its own network namespace, joined to a relay-side namespace by a veth pair;
a forwarder in this process carries its tunnel from the relay side to the relay's loopback
port. Dropping the agent's packets in its namespace leaves both TCP connections "up" — only
the keepalive can tell. Both ends must notice within two keepalive intervals, even with a
download in flight (whose writer then blocks on a full socket buffer), fail the caller at
once, and the agent must come back when the network does.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backhaul.devstack import DevStack, command
from tests.faults import netns
from tests.faults.harness import (
    BACKOFF_MAX,
    FAULT_ENV,
    PING_INTERVAL,
    log_events,
    relay_port,
    wait_for,
    write_relay_certificate,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

_unavailable = netns.available()


@pytest.fixture
def network() -> Iterator[netns.NetnsPair]:
    if _unavailable:
        pytest.skip(_unavailable)
    pair = netns.NetnsPair()
    try:
        with pair:
            yield pair
    finally:
        left = netns.namespaces_left()
        assert pair.relay_ns not in left and pair.agent_ns not in left


def _first(stack: DevStack, name: str, event: str, after: dt.datetime) -> dt.datetime | None:
    for doc in log_events(stack, name, event):
        at = dt.datetime.fromisoformat(doc["timestamp"])
        if at >= after:
            return at
    return None


def test_half_open_tunnel_is_detected_by_both_ends_within_two_intervals(
    network: netns.NetnsPair, tmp_path: Path
) -> None:
    with DevStack(tmp_path, env=FAULT_ENV) as stack:
        write_relay_certificate(stack.relay_dir, network.relay_ip)
        stack.start_relay()
        stack.create_admin()
        # The internal API lives next to the agent, on the agent namespace's own loopback.
        ready = tmp_path / "api.json"
        sample = [sys.executable, "-m", "backhaul.sampleapi", "--port", "8080"]
        stack.spawn("netns-api", network.exec_argv([*sample, "--ready-file", str(ready)]))
        wait_for(ready.exists, 20)
        api = "http://127.0.0.1:8080/"
        gateway_id, agent_dir = stack.enroll(name="netns-agent", allow=[api])
        with netns.Forwarder(
            network.listen_on_relay_side(), ("127.0.0.1", relay_port(stack))
        ) as forwarder:
            stack.set_agent_config(
                agent_dir, relay_url=f"https://{network.relay_ip}:{forwarder.port}"
            )
            argv = [command("backhaul-agent"), "run", "--config-dir", str(agent_dir)]
            stack.spawn("netns-agent", network.exec_argv(argv))
            stack.wait_connected(agent_dir, "netns-agent")
            cid = stack.connection(gateway_id, api)
            with stack.client(timeout=10) as client:
                assert client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200

            download: dict[str, object] = {}

            def download_forever() -> None:
                received = 0
                try:
                    with stack.client(timeout=10) as client:
                        url = f"/v1/connections/{cid}/invoke/bytes/{1 << 40}"
                        with client.stream("GET", url) as response:
                            for chunk in response.iter_raw():
                                received += len(chunk)
                                download.setdefault("flowing", time.monotonic())
                except httpx.HTTPError as exc:
                    download["error"] = type(exc).__name__
                download["ended"] = time.monotonic()
                download["bytes"] = received

            reader = threading.Thread(target=download_forever, daemon=True)
            reader.start()
            wait_for(lambda: "flowing" in download, 10)
            time.sleep(0.3)

            dropped_at = dt.datetime.now(dt.UTC)
            dropped = time.monotonic()
            network.blackhole()
            bound = 2 * PING_INTERVAL

            detected: dict[str, dt.datetime] = {}

            def both_detected() -> bool:
                for name in ("relay", "netns-agent"):
                    at = _first(stack, name, "tunnel.dead", dropped_at)
                    if at is not None:
                        detected[name] = at
                return len(detected) == 2

            wait_for(both_detected, bound + 5, step=0.1)
            for name, at in detected.items():
                took = (at - dropped_at).total_seconds()
                assert took <= bound + 0.25, f"{name} noticed after {took:.2f}s"

            # The caller's download failed at once instead of hanging until its read timeout.
            reader.join(10)
            assert download.get("error"), download
            assert float(download["ended"]) - dropped < bound + 1.0  # type: ignore[arg-type]
            # The relay routes nothing to the dead member.
            with stack.client(timeout=10) as client:
                started = time.monotonic()
                response = client.get(f"/v1/connections/{cid}/invoke/hello")
                assert response.status_code == 503, response.text
                assert time.monotonic() - started < 1.0
            assert stack.agent_status(agent_dir)["connected"] is False

            # The network comes back: so does the agent, within its backoff and connect bound.
            network.restore()
            restored = time.monotonic()
            wait_for(lambda: bool(stack.agent_status(agent_dir).get("connected")), 15, 0.2)
            assert time.monotonic() - restored < BACKOFF_MAX + 2 * PING_INTERVAL + 2.0
            with stack.client(timeout=10) as client:
                assert client.get(f"/v1/connections/{cid}/invoke/hello").status_code == 200
            stack.stop_process("netns-agent", timeout=10)
