"""Gateway clusters with real processes: load balancing, disable, failover, rolling restart."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backhaul.devstack import DevStack
from tests.e2e.conftest import FAST_ENV

pytestmark = pytest.mark.e2e


class Cluster:
    def __init__(self, stack: DevStack) -> None:
        self.stack = stack
        self.api = stack.start_api()
        self.gateway_id, self.dir_a = stack.enroll(name="a", allow=[self.api])
        _, self.dir_b = stack.enroll(self.gateway_id, name="b", allow=[self.api])
        stack.start_agent(self.dir_a)
        stack.start_agent(self.dir_b)
        self.cid = stack.connection(self.gateway_id, self.api)

    def members(self) -> dict[str, dict[str, object]]:
        doc = self.stack.call("GET", f"/v1/gateways/{self.gateway_id}")
        return {str(m["name"]): m for m in doc["members"]}

    def totals(self) -> dict[str, int]:
        return {name: int(str(m["total"])) for name, m in self.members().items()}

    def get(self, client: httpx.Client, path: str = "hello") -> httpx.Response:
        return client.get(f"/v1/connections/{self.cid}/invoke/{path}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with DevStack(tmp_path, env=FAST_ENV) as stack:
        stack.start_relay()
        stack.create_admin()
        yield Cluster(stack)


def test_two_members_share_one_gateway_key(cluster: Cluster) -> None:
    members = cluster.members()
    assert set(members) == {"a", "b"}
    assert all(m["online"] for m in members.values())
    assert [members["a"]["priority"], members["b"]["priority"]] == [0, 1]


def test_round_robin_primary_failover_and_disable(cluster: Cluster) -> None:
    stack, gw = cluster.stack, cluster.gateway_id
    with stack.client() as client:
        stack.call("PATCH", f"/v1/gateways/{gw}", json={"load_balancing": "round-robin"})
        before = cluster.totals()
        for _ in range(10):
            assert cluster.get(client).status_code == 200
        after = cluster.totals()
        assert {n: after[n] - before[n] for n in after} == {"a": 5, "b": 5}

        stack.call("PATCH", f"/v1/gateways/{gw}", json={"load_balancing": "primary-failover"})
        before = cluster.totals()
        for _ in range(6):
            assert cluster.get(client).status_code == 200
        after = cluster.totals()
        assert after["a"] - before["a"] == 6 and after["b"] == before["b"]

        member_a = str(cluster.members()["a"]["id"])
        r = client.post(f"/v1/gateways/{gw}/members/{member_a}/disable")
        assert r.status_code == 204
        assert cluster.members()["a"]["disabled"] is True
        before = cluster.totals()
        for _ in range(4):
            assert cluster.get(client).status_code == 200
        after = cluster.totals()
        assert after["b"] - before["b"] == 4 and after["a"] == before["a"]
        assert client.post(f"/v1/gateways/{gw}/members/{member_a}/enable").status_code == 204
        before = cluster.totals()
        assert cluster.get(client).status_code == 200
        assert cluster.totals()["a"] == before["a"] + 1  # primary again


def test_member_killed_new_requests_go_to_the_other_at_once(cluster: Cluster) -> None:
    stack = cluster.stack
    stack.call(
        "PATCH", f"/v1/gateways/{cluster.gateway_id}", json={"load_balancing": "primary-failover"}
    )
    results: dict[str, object] = {}
    with stack.client() as client:

        def in_flight_post() -> None:
            started = time.monotonic()
            r = client.post(f"/v1/connections/{cluster.cid}/invoke/slow/20", content=b"x")
            results["post"] = (r.status_code, r.json().get("title"), time.monotonic() - started)

        def in_flight_get() -> None:
            results["get"] = cluster.get(client, "slow/1").status_code

        threads = [threading.Thread(target=in_flight_post), threading.Thread(target=in_flight_get)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # both are on member a (the primary)
        stack.stop_process("a", signal.SIGKILL)
        killed = time.monotonic()
        while cluster.get(client).status_code != 200:
            assert time.monotonic() - killed < 1.0, "no failover within 1 s"
        failover = time.monotonic() - killed
        for t in threads:
            t.join(15)
    status, title, took = results["post"]  # type: ignore[misc]
    assert status == 502 and title == "Gateway member lost" and took < 5
    assert results["get"] == 200  # not yet streaming: retried once on member b
    assert failover < 1.0


def test_rolling_restart_loses_no_request(cluster: Cluster) -> None:
    stack = cluster.stack
    failures: list[str] = []
    done = threading.Event()
    counts = [0]

    def load() -> None:
        with stack.client(timeout=30) as client:
            while not done.is_set():
                try:
                    if counts[0] % 2:
                        r = client.post(
                            f"/v1/connections/{cluster.cid}/invoke/echo/x", content=b"payload"
                        )
                    else:
                        r = cluster.get(client, "slow/0.2")
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                counts[0] += 1

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        for name, config_dir in (("a", cluster.dir_a), ("b", cluster.dir_b)):
            time.sleep(1)
            assert stack.stop_process(name, signal.SIGTERM, timeout=30) == 0
            time.sleep(0.5)
            stack.start_agent(config_dir, name)
        time.sleep(1)
    finally:
        done.set()
        for w in workers:
            w.join(30)
    assert counts[0] > 50
    assert failures == [], _notable_lines(stack, ("relay", "a", "b"))


def _notable_lines(stack: DevStack, names: tuple[str, ...]) -> str:
    """What each process logged above the info level, or about a stream that did not end
    well: enough to tell from a failed run which side cut an answer short."""
    marks = (
        '"level": "warning"',
        '"level": "error"',
        "cancel",
        "crash",
        "reset",
        "refused",
        "drain",
        "goaway",
        "retry",
    )
    report = []
    for name in names:
        lines = [
            line
            for line in stack.log_text(name).splitlines()
            if any(mark in line.lower() for mark in marks)
        ]
        report.append(f"--- {name}\n" + "\n".join(lines[-40:]))
    return "\n".join(report)
