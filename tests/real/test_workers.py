"""Worker processes on one machine, against the machine's real Redis: ``serve --workers 2``
spreads fresh connections over both workers, a worker without the agent's tunnel forwards to
the one that has it, a killed worker is restarted and calls succeed again, and SIGTERM stops
everything with status 0. An agent left to its default holds a tunnel to each worker, and no
request is forwarded."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from backhaul.devstack import DevStack, free_port
from relay.workers import STOP_GRACE_SECONDS
from tests.e2e.conftest import FAST_ENV

pytestmark = pytest.mark.real

#: A database number of its own, so these keys never meet those of other tests (pub/sub
#: channels are server-wide, but events about unknown members change nothing).
REDIS = "redis://127.0.0.1:6379/3"


@pytest.fixture
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS} (make services starts it): {exc}")
    finally:
        client.close()
    return REDIS


def events(stack: DevStack, name: str = "relay") -> list[dict[str, Any]]:
    """The relay's JSON log lines (supervisor and workers write to the same stream)."""
    out = []
    for line in stack.log_text(name).splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def ready_workers(stack: DevStack) -> dict[str, dict[str, Any]]:
    """The latest ``worker.ready`` event of each worker: pid and peer URL."""
    latest: dict[str, dict[str, Any]] = {}
    for event in events(stack):
        if event.get("event") == "worker.ready":
            latest[event["worker"]] = event
    return latest


def _all_ready(stack: DevStack, count: int) -> dict[str, dict[str, Any]] | None:
    ready = ready_workers(stack)
    return ready if len(ready) == count else None


def _restarted(stack: DevStack, worker: str, old_pid: int) -> dict[str, Any] | None:
    ready = ready_workers(stack).get(worker)
    return ready if ready is not None and ready["pid"] != old_pid else None


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


def invokes_answered(peer_url: str, tls: ssl.SSLContext) -> float:
    """``backhaul_relay_requests_total`` of one worker, all codes together."""
    text = httpx.get(f"{peer_url}/metrics", verify=tls).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("backhaul_relay_requests_total{")
    )


def fresh_calls(stack: DevStack, path: str, count: int) -> list[httpx.Response]:
    """``count`` GETs, each on a new TCP connection, so the kernel picks a worker each time."""
    responses = []
    for _ in range(count):
        with stack.client(timeout=30) as client:
            responses.append(client.get(path))
    return responses


def _env(redis_url: str) -> dict[str, str]:
    return FAST_ENV | {
        "BACKHAUL_RELAY_REDIS_URL": redis_url,
        "BACKHAUL_RELAY_REGISTRY_TTL_SECONDS": "3",
    }


def _two_workers(
    stack: DevStack, instance_id: str, extra: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """``serve --workers 2`` started, and both workers' ``worker.ready`` events."""
    stack.start_relay(extra=["--workers", "2", "--instance-id", instance_id, *extra])
    ready: dict[str, dict[str, Any]] = wait_for(
        lambda: _all_ready(stack, 2), 30, "two workers ready"
    )
    return ready


def test_workers_need_redis(tmp_path: Path) -> None:
    relay = Path(sys.executable).parent / "backhaul-relay"
    done = subprocess.run(
        [str(relay), "serve", "--dev", "--data-dir", str(tmp_path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_RELAY_")},
    )
    assert done.returncode == 2
    assert "workers > 1 needs redis_url" in done.stderr


def test_two_workers_share_the_port_forward_restart_and_stop(
    tmp_path: Path, redis_url: str
) -> None:
    with DevStack(tmp_path, env=_env(redis_url)) as stack:
        workers = _two_workers(stack, "relay")
        assert set(workers) == {"relay-w1", "relay-w2"}
        stack.create_admin()
        api = stack.start_api()
        gateway_id, agent_dir = stack.enroll(name="agent", allow=[api])
        # One tunnel only (not one per worker), so that the other worker has to forward.
        stack.set_agent_config(agent_dir, tunnel={"per_worker": False})
        stack.start_agent(agent_dir)
        cid = stack.connection(gateway_id, api)
        invoke = f"/v1/connections/{cid}/invoke/hello"
        assert stack.agent_status(agent_dir)["tunnels"] == 1

        # Every worker is a full relay on its own peer URL: probes and metrics answer there.
        tls = stack.tls()
        for worker, ready in workers.items():
            peer = ready["peer_url"]
            assert peer.startswith("https://127.0.0.1:")
            for probe in ("/healthz", "/readyz"):
                assert httpx.get(peer + probe, verify=tls).status_code == 200, (worker, probe)
            assert "backhaul_relay_requests_total" in httpx.get(peer + "/metrics", verify=tls).text

        # Fresh connections land on both workers; the one without the tunnel forwards.
        responses = fresh_calls(stack, invoke, 80)
        assert [r.status_code for r in responses] == [200] * 80, [r.text for r in responses][:3]
        holder = stack.call("GET", f"/v1/gateways/{gateway_id}")["members"][0]["instance"]
        assert holder in workers
        forwarded = [r for r in responses if "x-backhaul-instance" in r.headers]
        assert forwarded, "no request landed on the worker without the tunnel"
        assert {r.headers["x-backhaul-instance"] for r in forwarded} == {holder}
        # Both served: the other worker answered its share by forwarding each call to the
        # holder, which therefore answered all of them (its own metrics say so).
        sent = [e for e in events(stack) if e.get("event") == "forward.sent"]
        assert len(sent) == len(forwarded)
        assert {(e["worker"], e["to"]) for e in sent} == {(other, holder) for other in workers} - {
            (holder, holder)
        }
        assert invokes_answered(workers[holder]["peer_url"], tls) >= len(responses)

        # SIGKILL the worker that holds the tunnel: the supervisor starts it again, the agent
        # reconnects through the same port, and calls succeed again on every worker.
        killed = workers[holder]["pid"]
        os.kill(killed, signal.SIGKILL)
        restarted = wait_for(lambda: _restarted(stack, holder, killed), 30, f"{holder} back")
        assert restarted["peer_url"] != workers[holder]["peer_url"]
        assert any(
            e.get("event") == "worker.exited" and e.get("pid") == killed and e.get("code") == -9
            for e in events(stack)
        )
        with stack.client() as client:
            wait_for(lambda: client.get(invoke).status_code == 200, 20, "calls succeed again")
        stack.wait_connected(agent_dir, "agent")
        responses = fresh_calls(stack, invoke, 40)
        assert [r.status_code for r in responses] == [200] * 40, [r.text for r in responses][:3]
        assert any("x-backhaul-instance" in r.headers for r in responses), "one worker idle"

        # SIGTERM: every worker drains and exits, then the supervisor exits 0.
        pids = {e["pid"] for e in events(stack) if e.get("event") == "worker.started"}
        started = time.monotonic()
        assert stack.stop_process("relay", signal.SIGTERM, timeout=STOP_GRACE_SECONDS + 10) == 0
        assert time.monotonic() - started < STOP_GRACE_SECONDS
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        exits = [e for e in events(stack) if e.get("event") == "worker.exited"]
        assert {e["code"] for e in exits if e["pid"] != killed} == {0}


def _tunnel_holders(stack: DevStack, member_id: str) -> dict[str, int]:
    """Per worker, the tunnels of ``member_id`` it accepted (``tunnel.connected``)."""
    held: dict[str, int] = {}
    for event in events(stack):
        if event.get("event") == "tunnel.connected" and event.get("member_id") == member_id:
            held[event["worker"]] = held.get(event["worker"], 0) + 1
    return held


def test_the_agent_holds_a_tunnel_to_each_worker_and_nothing_is_forwarded(
    tmp_path: Path, redis_url: str
) -> None:
    local = f"127.0.0.1:{free_port()}"
    with DevStack(tmp_path, env=_env(redis_url)) as stack:
        workers = _two_workers(stack, "spread", ("--local-listen", local))
        stack.create_admin()
        api = stack.start_api()
        gateway_id, agent_dir = stack.enroll(name="agent", allow=[api])
        stack.start_agent(agent_dir)
        member_id = stack.agent_status(agent_dir)["member_id"]
        wait_for(lambda: stack.agent_status(agent_dir).get("tunnels") == 2, 30, "two tunnels")
        assert set(_tunnel_holders(stack, member_id)) == set(workers)
        cid = stack.connection(gateway_id, api)
        invoke = f"/v1/connections/{cid}/invoke/hello"

        # Fresh connections land on both workers, and each answers from its own tunnel.
        responses = fresh_calls(stack, invoke, 60)
        assert [r.status_code for r in responses] == [200] * 60, [r.text for r in responses][:3]
        assert not [r for r in responses if "x-backhaul-instance" in r.headers]
        assert not [e for e in events(stack) if e.get("event") == "forward.sent"]
        tls = stack.tls()
        answered = {w: invokes_answered(ready["peer_url"], tls) for w, ready in workers.items()}
        for worker, count in answered.items():
            assert count > 0, f"{worker} answered nothing"

        # The local listener (plain HTTP on loopback) is shared by the workers the same way.
        auth = {"Authorization": f"Bearer {stack.admin_token}"}
        plain = [httpx.get(f"http://{local}{invoke}", headers=auth) for _ in range(60)]
        assert [r.status_code for r in plain] == [200] * 60, [r.text for r in plain][:3]
        for worker, ready in workers.items():
            assert invokes_answered(ready["peer_url"], tls) > answered[worker], worker
        # The additional tunnel was turned away from the worker that held the first, never
        # the other way round: no tunnel of the member was replaced.
        log = stack.log_text("relay")
        assert "replaced by a newer tunnel" not in log
        assert stack.agent_status(agent_dir)["reconnects"] == 0

        # A worker killed: the supervisor starts it again and the agent is back on both.
        victim = sorted(workers)[0]
        killed = workers[victim]["pid"]
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: _restarted(stack, victim, killed), 30, f"{victim} back")
        wait_for(lambda: _tunnel_holders(stack, member_id).get(victim, 0) >= 2, 30, "tunnel again")
        wait_for(lambda: stack.agent_status(agent_dir).get("tunnels") == 2, 30, "two tunnels")
        responses = fresh_calls(stack, invoke, 40)
        assert [r.status_code for r in responses] == [200] * 40, [r.text for r in responses][:3]
        assert not [e for e in events(stack) if e.get("event") == "forward.sent"]

        # SIGTERM on the agent: every tunnel drains and the agent exits 0.
        assert stack.stop_process("agent", signal.SIGTERM, timeout=30) == 0
        agent_log = stack.log_text("agent")
        assert agent_log.count("link.draining") == 2, agent_log[-2000:]
