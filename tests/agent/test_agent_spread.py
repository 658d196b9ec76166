"""One tunnel per relay worker (agent.spread): what WELCOME says, how an additional tunnel
retries when it reaches a worker that holds one, and how the set follows the main link.
The real relay with two workers is in tests/real/test_workers.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent import link as link_module
from agent.config import AgentConfig
from agent.link import Link, _workers
from agent.spread import Spread
from agent.state import AgentState
from backhaul import handshake
from backhaul.aio.tunnel import TransportClosed
from backhaul.wire import CLOSE_CODE_BASE, ErrorCode


@pytest.fixture
def cfg(make_config: Callable[..., AgentConfig]) -> AgentConfig:
    return make_config(tunnel={"backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05})


def _state(cfg: AgentConfig) -> AgentState:
    return AgentState(relay=cfg.relay_url, member_id=cfg.member_id, gateway_id=cfg.gateway_id)


@pytest.mark.parametrize(
    ("welcome", "workers"),
    [
        ({}, 1),
        ({"workers": 4}, 4),
        ({"workers": 0}, 1),
        ({"workers": -2}, 1),
        ({"workers": True}, 1),
        ({"workers": "4"}, 1),
        ({"workers": 10**9}, link_module.MAX_WORKERS),
    ],
)
def test_the_worker_count_is_read_from_welcome_and_bounded(
    welcome: dict[str, Any], workers: int
) -> None:
    assert _workers(welcome) == workers


def test_an_additional_hello_says_so_and_the_relay_reads_it() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    relay = handshake.relay_hello(handshake.new_challenge())
    plain = handshake.agent_hello(relay, key, "mbr_1", "gw_1", "host")
    extra = handshake.agent_hello(relay, key, "mbr_1", "gw_1", "host", additional=True)
    assert "additional" not in plain
    assert extra["additional"] is True
    assert handshake.parse_agent_hello(plain).additional is False
    assert handshake.parse_agent_hello(extra).additional is True
    # Only the JSON true counts: anything else is a main tunnel, which replaces.
    assert handshake.parse_agent_hello({**plain, "additional": "yes"}).additional is False


async def test_an_additional_tunnel_tries_again_until_it_reaches_a_free_worker(
    cfg: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    lane = _state(cfg)
    link = Link(cfg, ed25519.Ed25519PrivateKey.generate(), lane, _no_streams, additional=True)
    assert link.additional
    stop = asyncio.Event()
    attempts: list[str] = []

    async def connect_and_serve(url: str, stop_: asyncio.Event) -> None:
        attempts.append(url)
        if len(attempts) < 4:  # three workers taken, then one that is free
            raise TransportClosed("taken", CLOSE_CODE_BASE + ErrorCode.ALREADY_CONNECTED)
        link._served = True
        stop.set()  # served until the agent stopped

    monkeypatch.setattr(link, "_connect_and_serve", connect_and_serve)
    async with asyncio.timeout(5):
        await link.run_additional("https://relay.example.com", stop)
    assert attempts == ["https://relay.example.com"] * 4
    assert lane.reconnects == 3
    assert lane.last_error is None  # a taken worker is expected, not an error


async def test_an_additional_tunnel_gives_up_when_the_member_is_refused(
    cfg: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = Link(cfg, ed25519.Ed25519PrivateKey.generate(), _state(cfg), _no_streams, True)
    calls = 0

    async def refused(url: str, stop_: asyncio.Event) -> None:
        nonlocal calls
        calls += 1
        raise TransportClosed("member revoked", CLOSE_CODE_BASE + ErrorCode.UNAUTHORIZED)

    monkeypatch.setattr(link, "_connect_and_serve", refused)
    async with asyncio.timeout(5):
        await link.run_additional("https://relay.example.com", asyncio.Event())
    assert calls == 1


class _FakeLink:
    """Stands in for Link.run_additional: holds its "tunnel" until it is retired."""

    def __init__(self, lane: AgentState, runs: list[tuple[str, asyncio.Event]]) -> None:
        self.lane = lane
        self.runs = runs

    async def run_additional(self, url: str, stop: asyncio.Event) -> None:
        self.runs.append((url, stop))
        await stop.wait()


async def test_the_additional_tunnels_follow_the_main_link(cfg: AgentConfig) -> None:
    state = _state(cfg)
    stop = asyncio.Event()
    runs: list[tuple[str, asyncio.Event]] = []
    spread = Spread(lambda lane: _FakeLink(lane, runs), state, stop)  # type: ignore[arg-type,return-value]

    spread.want("https://a", 1)  # a relay without workers: nothing more
    spread.want("https://a", 3)  # three workers: two more tunnels
    spread.want("https://a", 3)  # said again on a reconnect: the same two
    await asyncio.sleep(0)
    assert [url for url, _ in runs] == ["https://a", "https://a"]
    assert len(state.additional) == 2

    spread.want("https://b", 2)  # the main link moved: the old ones retire, one new
    await asyncio.sleep(0)
    assert all(retired.is_set() for _, retired in runs[:2])
    assert [url for url, _ in runs[2:]] == ["https://b"]
    await asyncio.sleep(0)
    assert [lane.relay for lane in state.additional] == ["https://b"]

    stop.set()  # the agent stops: the rest retire at once, alongside the main link
    await asyncio.sleep(0)
    assert runs[2][1].is_set()
    spread.want("https://c", 4)  # nothing new once stopping
    async with asyncio.timeout(5):
        await spread.close()
    assert state.additional == []
    assert len(runs) == 3


async def test_status_counts_every_tunnel_and_their_streams(cfg: AgentConfig) -> None:
    from types import SimpleNamespace

    state = _state(cfg)
    state.tunnel = SimpleNamespace(closed=False, rtt_ms=1.0, inflight=2)  # type: ignore[assignment]
    lane = _state(cfg)
    lane.tunnel = SimpleNamespace(closed=False, rtt_ms=1.0, inflight=3)  # type: ignore[assignment]
    down = _state(cfg)
    state.additional += [lane, down]
    doc = state.snapshot()
    assert doc["tunnels"] == 2
    assert doc["inflight"] == 5


async def _no_streams(stream: object) -> None:
    raise AssertionError("no stream expected")
