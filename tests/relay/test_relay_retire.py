"""An additional tunnel whose worker the member's main tunnel came back to is retired, not
cut: GOAWAY, the stream in flight finishes, then the close (relay.tunnel._retire)."""

from __future__ import annotations

import asyncio

from relay import tunnel as relay_tunnel
from relay.hub import LiveTunnel
from tests.backhaul.aio.test_tunnel import held_answer, pattern, read_all, tunnel_pair


async def test_a_retired_additional_tunnel_finishes_its_stream_then_closes() -> None:
    handler, started, release = held_answer(100_000)
    goaway_seen = asyncio.Event()
    async with tunnel_pair(handler, agent_kw={"on_goaway": goaway_seen.set}) as pair:
        live = LiveTunnel("mbr_1", "gw_1", "ses_1", "1", "host", pair.relay, additional=True)
        async with asyncio.timeout(10):
            inflight = await pair.relay.open_stream({}, end_stream=True)
            await started.wait()
            retiring = asyncio.create_task(relay_tunnel._retire(live, grace=5))
            await goaway_seen.wait()
            await asyncio.sleep(0.05)
            assert not retiring.done()  # the stream in flight is waited for
            release.set()
            assert await inflight.response() == {"status": 200}
            assert await read_all(inflight) == pattern(100_000)
            await retiring
            await pair.agent.wait_closed()
    assert pair.link.closed is not None and pair.link.closed[0] == 1000
