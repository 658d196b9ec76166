"""A real agent process against a forged relay: the agent must refuse what its own rules
forbid (targets outside its allow-list or the sealed base URL, credentials bound to another
connection, window violations, unknown frames) with a clear log line, and keep serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backhaul.aio.tunnel import StreamError, Tunnel
from backhaul.wire import ErrorCode
from backhaul.wire import frames as f
from tests.agent.forged import PASSWORD, Forged, forged_relay, head, outcome
from tests.leaks import LeakCollector

pytestmark = pytest.mark.e2e


@pytest.fixture
async def forged(tmp_path: Path, leaks: LeakCollector) -> AsyncIterator[Forged]:
    leaks.secret("sample API password", PASSWORD)
    async with forged_relay(tmp_path) as world:
        yield world


async def test_agent_refuses_what_its_rules_forbid_and_keeps_serving(
    forged: Forged,
) -> None:
    tunnel: Tunnel = forged.tunnel
    api: str = forged.api
    ok = head(forged, api + "basic/x")
    assert await outcome(tunnel, ok) == 200

    # A target outside the allow-list, with a matching base URL (a relay lying about both).
    outside = "http://127.0.0.2:9/"
    assert await outcome(tunnel, head(forged, outside + "x", base=outside)) == (
        ErrorCode.TARGET_DENIED
    )
    # A target inside the allow-list but outside the sealed base URL.
    assert await outcome(tunnel, head(forged, api + "admin", base=api + "basic/")) == (
        ErrorCode.TARGET_DENIED
    )
    # Credentials sealed for another connection.
    moved = head(forged, api + "basic/x", cid="cxn_a", sealed_for="cxn_other")
    assert await outcome(tunnel, moved) == ErrorCode.CREDENTIALS_INVALID
    # A malformed head.
    bad = dict(ok, headers=[["x-bad", "a\r\nInjected: 1"]])
    assert await outcome(tunnel, bad) == ErrorCode.BAD_REQUEST
    # An unknown frame type is skipped.
    await tunnel.transport.send(f.HEADER.pack(0x7F, 0, 0) + b"junk")
    # A window violation on one stream resets that stream only. The upload goes to an API
    # that never reads, so the agent stops granting credit; the forged relay keeps sending.
    hole: str = forged.hole
    stream = await tunnel.open_stream(
        dict(head(forged, hole + "up", base=hole), method="POST", timeout_ms=60000)
    )
    piece = b"x" * tunnel.conn.peer.max_data
    for _ in range(512):  # up to 128 MiB, far beyond any window
        if stream.closed:
            break
        await tunnel.transport.send(f.encode(f.FrameType.DATA, stream.id, piece))
        await asyncio.sleep(0)
    with pytest.raises(StreamError) as info:
        await asyncio.wait_for(stream.response(), 10)
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR

    # And the agent still serves.
    assert await outcome(tunnel, ok) == 200
    assert forged.proc.poll() is None
    lines = forged.log_lines()
    reasons = " ".join(str(x.get("reason", "")) for x in lines)
    assert "127.0.0.2" in reasons
    assert PASSWORD not in forged.log.read_text()
