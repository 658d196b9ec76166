"""Prometheus metrics on both sides after real traffic — requests, durations, bytes, tunnel
connects and reconnects, flow-control stalls — and the Grafana dashboard, whose every query
must name a series the relay or the agent actually exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx

from agent.config import load_config
from backhaul.devstack import DevStack
from tests.ops.helpers import api_base, connected, wait_status

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "packaging" / "grafana" / "backhaul.json"
BIG = 24 * 1024 * 1024  # twelve times the 2 MiB stream window


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def agent_metrics(config_dir: Path) -> str:
    socket_path = load_config(config_dir, {}).status.socket
    transport = httpx.HTTPTransport(uds=str(socket_path))
    with httpx.Client(transport=transport) as client:
        return client.get("http://agent/metrics").text


def test_metrics_after_traffic_and_the_dashboard(ops_stack: DevStack) -> None:
    gateway_id, config_dir = ops_stack.enroll(name="metered", allow=[api_base(ops_stack)])
    ops_stack.start_agent(config_dir, "metered")
    try:
        wait_status(ops_stack, config_dir, connected)
        connection_id = ops_stack.connection(gateway_id, api_base(ops_stack))
        invoke = f"/v1/connections/{connection_id}/invoke"
        with ops_stack.client() as client:
            for _ in range(3):
                assert client.get(f"{invoke}/hello").status_code == 200
            assert client.get(f"{invoke}/status/404").status_code == 404
            # A slow caller: the agent runs out of window and has to wait for credit.
            with client.stream("GET", f"{invoke}/bytes/{BIG}") as response:
                time.sleep(1.0)
                received = sum(len(chunk) for chunk in response.iter_bytes())
            assert received == BIG
        agent = samples(agent_metrics(config_dir))
        relay_text = httpx.get(f"{ops_stack.relay_url}/metrics", verify=ops_stack.tls()).text
        relay = samples(relay_text)
    finally:
        ops_stack.stop_process("metered")

    assert agent['backhaul_agent_requests_total{outcome="ok"}'] >= 5
    assert agent["backhaul_agent_request_seconds_count"] >= 5
    assert agent['backhaul_agent_bytes_total{direction="down"}'] >= BIG
    assert agent["backhaul_agent_tunnel_connected"] == 1
    assert "backhaul_agent_reconnects_total" in agent
    assert agent["backhaul_agent_flow_stalls_total"] >= 1
    assert relay['backhaul_relay_requests_total{code="200"}'] >= 4
    assert relay['backhaul_relay_requests_total{code="404"}'] >= 1
    assert relay["backhaul_relay_request_seconds_count"] >= 5
    assert relay['backhaul_relay_bytes_total{direction="response"}'] >= BIG
    assert relay["backhaul_relay_tunnel_connects_total"] >= 1
    assert "backhaul_relay_flow_stalls_total" in relay
    assert relay["backhaul_relay_tunnels"] >= 1

    dashboard = json.loads(DASHBOARD.read_text())
    exported = {re.sub(r"\{.*", "", name) for name in (*agent, *relay)}
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(exprs) >= 10
    for expr in exprs:
        for name in re.findall(r"\bbackhaul_[a-z_]+", expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for word in ("requests", "latency", "bytes", "reconnects", "stalls", "tunnels"):
        assert word in titles, word
    assert total(agent, "backhaul_agent_requests_total") >= 5
