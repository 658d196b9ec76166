"""A real agent against a hostile relay, one attack at a time: the agent refuses each with a
clear log line and keeps serving (on the same tunnel, or on the next one when the attack
broke the tunnel itself)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from backhaul.aio.tunnel import StreamError, Tunnel
from backhaul.keys import b64e
from backhaul.seal import seal
from backhaul.wire import ErrorCode
from backhaul.wire import frames as f
from tests.agent.forged import PASSWORD, Forged, forged_relay, head, outcome
from tests.leaks import LeakCollector

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

FAST_RECONNECT = {"tunnel": {"backoff_initial_seconds": 0.1, "backoff_max_seconds": 0.5}}


@pytest.fixture
async def forged(tmp_path: Path, leaks: LeakCollector) -> AsyncIterator[Forged]:
    leaks.secret("sample API password", PASSWORD)
    async with forged_relay(tmp_path, **FAST_RECONNECT) as world:
        yield world


def _events(world: Forged, event: str) -> list[dict[str, Any]]:
    return [line for line in world.log_lines() if line.get("event") == event]


async def _wait_for_log(world: Forged, event: str, timeout: float = 5) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (found := _events(world, event)):
        assert time.monotonic() < deadline, f"no {event} in the agent's log"
        await asyncio.sleep(0.05)
    return found


async def _still_serves(world: Forged, tunnel: Tunnel) -> None:
    assert await outcome(tunnel, head(world, world.api + "basic/x")) == 200
    assert world.proc.poll() is None
    assert PASSWORD not in world.log.read_text()


async def test_unknown_frame_types_are_skipped_and_logged(forged: Forged) -> None:
    tunnel = forged.tunnel
    for ftype, sid in ((0x00, 0), (0x7F, 0), (0xFF, 5), (0x0E, 1)):
        await tunnel.transport.send(f.HEADER.pack(ftype, 0, sid) + b"from a later version?")
    await _still_serves(forged, tunnel)
    logged = {e["frame_type"] for e in await _wait_for_log(forged, "tunnel.unknown_frame")}
    assert logged == {0x00, 0x7F, 0xFF, 0x0E}


async def test_malformed_and_huge_heads_are_refused_per_stream(forged: Forged) -> None:
    tunnel = forged.tunnel
    ok = head(forged, forged.api + "basic/x")
    huge = dict(ok, headers=[["x-filler", "a" * 8000] for _ in range(20)])  # 160 KiB
    assert await outcome(tunnel, huge) == ErrorCode.BAD_REQUEST
    many = dict(ok, headers=[["x-h", "v"]] * 300)
    assert await outcome(tunnel, many) == ErrorCode.BAD_REQUEST
    unknown_field = dict(ok, proxy="http://evil.example/")
    assert await outcome(tunnel, unknown_field) == ErrorCode.BAD_REQUEST
    # An OPEN that is not JSON at all is refused by the protocol layer, the stream only.
    sid = tunnel.conn._next_stream_id
    tunnel.conn._next_stream_id += 2
    await tunnel.transport.send(f.encode(f.FrameType.OPEN, sid, b"\xff{not json"))
    await _still_serves(forged, tunnel)
    reasons = " ".join(e["reason"] for e in _events(forged, "stream.failed"))
    assert "headers exceed" in reasons and "unknown field" in reasons
    refused = await _wait_for_log(forged, "tunnel.stream_refused")
    assert [(e["stream_id"], e["code"]) for e in refused] == [(sid, "PROTOCOL_ERROR")]


async def test_a_frame_beyond_the_agents_limit_costs_the_tunnel_not_the_agent(
    forged: Forged,
) -> None:
    tunnel = forged.tunnel
    limit = tunnel.conn.peer.max_message
    await tunnel.transport.send(f.encode(f.FrameType.DATA, 1, b"x" * limit))
    await tunnel.wait_closed()
    down = await _wait_for_log(forged, "link.down")
    assert "1009" in down[-1]["reason"] or "too big" in down[-1]["reason"], down[-1]
    await _still_serves(forged, await forged.relay.next_tunnel())


async def test_window_violations_reset_the_stream_or_end_the_tunnel(forged: Forged) -> None:
    tunnel = forged.tunnel
    # Stream level: more DATA than the agent granted on one stream.
    stream = await tunnel.open_stream(
        dict(head(forged, forged.hole + "up", base=forged.hole), method="POST", timeout_ms=60000)
    )
    piece = b"x" * tunnel.conn.peer.max_data
    for _ in range(512):
        if stream.closed:
            break
        await tunnel.transport.send(f.encode(f.FrameType.DATA, stream.id, piece))
        await asyncio.sleep(0)
    with pytest.raises(StreamError) as info:
        await asyncio.wait_for(stream.response(), 10)
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR
    await _still_serves(forged, tunnel)
    refused = await _wait_for_log(forged, "tunnel.stream_refused")
    assert refused[-1]["code"] == "FLOW_CONTROL_ERROR"
    # Tunnel level: a WINDOW increment that overflows the tunnel's send window.
    await tunnel.transport.send(f.encode_window(0, f.MAX_WINDOW))
    await tunnel.wait_closed()
    errors = await _wait_for_log(forged, "tunnel.protocol_error")
    assert errors[-1]["code"] == "FLOW_CONTROL_ERROR"
    await _still_serves(forged, await forged.relay.next_tunnel())


async def test_streams_that_never_end_are_cut_at_their_deadline(forged: Forged) -> None:
    tunnel = forged.tunnel
    # A request body that never ends, to an API that waits for all of it.
    endless = dict(head(forged, forged.api + "upload"), method="POST", timeout_ms=1500)
    stream = await tunnel.open_stream(endless)
    started = time.monotonic()

    async def trickle() -> None:
        while not stream.closed:
            await stream.write(b"more ")
            await asyncio.sleep(0.05)

    feeder = asyncio.create_task(trickle())
    with pytest.raises(StreamError) as info:
        await asyncio.wait_for(stream.response(), 10)
    feeder.cancel()
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert 1.4 < time.monotonic() - started < 3.0
    failed = [e for e in _events(forged, "stream.failed") if e["stream_id"] == stream.id]
    assert failed and "1500 ms deadline" in failed[0]["reason"]
    # A response the relay never reads (no WINDOW ever): parked, and nobody else waits.
    parked = await tunnel.open_stream(head(forged, forged.api + "bytes/1073741824"), True)
    await asyncio.wait_for(parked.response(), 10)
    for _ in range(5):
        await _still_serves(forged, tunnel)
    await parked.reset(ErrorCode.CANCEL, "done")


async def test_credentials_bound_elsewhere_and_targets_outside_are_refused(
    forged: Forged,
) -> None:
    tunnel = forged.tunnel
    api = forged.api
    cases = {
        "another connection": head(forged, api + "basic/x", cid="cxn_a", sealed_for="cxn_b"),
        "outside the allow-list": head(
            forged, "http://127.0.0.3:8080/x", base="http://127.0.0.3:8080/"
        ),
        "outside the base URL": head(forged, api + "admin", base=api + "basic/"),
        "dot segments": head(forged, api + "basic/../admin", base=api + "basic/"),
        "encoded slash": head(forged, api + "basic/..%2fadmin", base=api + "basic/"),
        "userinfo trick": head(forged, "http://x@127.0.0.3:8080/", base="http://x@127.0.0.3:8080/"),
    }
    # Credentials sealed for the API's root, presented for a narrower base URL.
    suite, blob = seal(
        forged.gateway.public_text(), "cxn_a", api, {"username": "alice", "password": PASSWORD}
    )
    narrowed = dict(
        head(forged, api + "basic/x", base=api + "basic/"), suite=suite, sealed=b64e(blob)
    )
    cases["another base URL"] = narrowed
    got = {name: await outcome(tunnel, h) for name, h in cases.items()}
    assert got == {
        "another connection": ErrorCode.CREDENTIALS_INVALID,
        "outside the allow-list": ErrorCode.TARGET_DENIED,
        "outside the base URL": ErrorCode.TARGET_DENIED,
        "dot segments": ErrorCode.TARGET_DENIED,
        "encoded slash": ErrorCode.TARGET_DENIED,
        "userinfo trick": ErrorCode.TARGET_DENIED,
        "another base URL": ErrorCode.CREDENTIALS_INVALID,
    }
    await _still_serves(forged, tunnel)
    reasons = [e["reason"] for e in _events(forged, "stream.failed")]
    assert len(reasons) == len(cases)
    assert any("127.0.0.3" in r for r in reasons)
    assert any("do not open here" in r for r in reasons)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_relay_that_pings_and_never_reads_the_pongs_is_held_back(forged: Forged) -> None:
    """The forged relay stops reading and floods PINGs. The agent answers each with a PONG
    it cannot send, stops taking messages once its writes wait, and stops reading: the
    flood stalls in TCP (a few MB of socket buffers) instead of growing the agent without
    bound. The relay hangs up; the agent is back on a new tunnel and serves."""
    tunnel = forged.tunnel
    ws = tunnel.transport.ws  # type: ignore[attr-defined]
    ws.transport.pause_reading()
    before = _rss_kib(forged.proc.pid)
    ping = f.encode_ping(f.FrameType.PING, 1)
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while True:
            await ws.send(ping)
            sent += 1

    task = asyncio.create_task(flood())
    try:
        # Stalled once a second passes without a PING taken. Filling the socket buffers
        # takes a few seconds (less than half a million PINGs); an agent that keeps reading
        # takes two million a second and never stalls.
        deadline = time.monotonic() + 30
        last = -1
        while sent != last:
            assert time.monotonic() < deadline, f"the agent kept reading: {sent} PINGs"
            last = sent
            await asyncio.sleep(1)
        assert sent < 3_000_000, f"the agent read {sent} PINGs before it stopped"
        grown = _rss_kib(forged.proc.pid) - before
        assert grown < 64 * 1024, f"the agent grew {grown} KiB for {sent} PINGs"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        ws.transport.abort()
    await _still_serves(forged, await forged.relay.next_tunnel())
