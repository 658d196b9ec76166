"""The agent's tunnel connection: frames parsed out of the chunk reader, messages sent by
``send_message``, websockets' own behaviour once the connection is no longer open."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from agent.config import AgentConfig
from agent.link import TunnelClientConnection, WebSocketTransport
from backhaul.aio.tunnel import TransportClosed
from backhaul.aio.wsreader import ChunkReader
from tests.feeds import Feed


@contextlib.asynccontextmanager
async def tunnel_client(
    handler: Callable[[ServerConnection], Awaitable[None]], max_size: int = 2**20
) -> AsyncIterator[TunnelClientConnection]:
    """The agent's tunnel connection to a websockets server running ``handler``."""
    async with serve(handler, "127.0.0.1", 0, max_size=max_size) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(
            f"ws://127.0.0.1:{port}", create_connection=TunnelClientConnection, max_size=max_size
        ) as ws:
            assert isinstance(ws, TunnelClientConnection)
            yield ws


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        if message == b"bye":
            await ws.close(4001, "asked to")
            return
        await ws.send(message)


async def test_messages_go_out_whole_and_come_back_whole() -> None:
    messages = [os.urandom(n) for n in (0, 5, 125, 126, 16_383, 16_384, 65_536, 2_000_000)]
    async with tunnel_client(echo, max_size=2**22) as ws:
        assert isinstance(ws.protocol.reader, ChunkReader)
        for message in messages:
            await ws.send_message(message)
        for message in messages:
            assert await ws.recv() == message


async def test_once_the_peer_closed_sending_raises_as_websockets_does() -> None:
    async with tunnel_client(echo) as ws:
        transport = WebSocketTransport(ws)
        await transport.send(b"bye")
        with pytest.raises(TransportClosed) as closed:
            await transport.recv()
        assert closed.value.code == 4001
        with pytest.raises(ConnectionClosed):
            await ws.send_message(b"after the close")
        with pytest.raises(TransportClosed):
            await transport.send(b"after the close")


async def test_pushed_messages_reach_the_feed_and_a_fragmented_one_keeps_its_place() -> None:
    """After push_to, whole binary messages go to the feed as they are parsed. A message
    in fragments goes to websockets' queue, and so does every message behind it until
    recv has taken it; so does one the feed refuses. The tunnel sees them all in order."""
    ready = asyncio.Event()

    feed = Feed()
    fed = feed.fed

    async def talk(ws: ServerConnection) -> None:
        await ws.send(b"before")
        await ready.wait()
        await ws.send(b"one")
        await ws.send([b"frag", b"mented"])  # a message in two frames
        await ws.send(b"behind it")
        await ws.recv()
        await ws.send(b"refused")
        await ws.recv()  # until the client closes

    async with tunnel_client(talk) as ws:
        transport = WebSocketTransport(ws)
        while not ws._queued():
            await asyncio.sleep(0.01)
        assert not transport.push_to(feed)  # "before" waits in the queue
        assert await transport.recv() == b"before"
        assert transport.push_to(feed)
        ready.set()
        while len(ws.recv_messages.frames.queue) < 3:  # two fragments, then "behind it"
            await asyncio.sleep(0.01)
        assert fed == [b"one"]
        assert await transport.recv() == b"fragmented"
        assert await transport.recv() == b"behind it"
        feed.refusing = True
        await ws.send(b"next")
        assert await transport.recv() == b"refused"
        await ws.send(b"done")
        assert fed == [b"one"]


def test_the_tunnels_and_the_apis_tls_objects_hand_records_straight_to_openssl(
    make_config: Callable[..., AgentConfig],
) -> None:
    """The link's context (to the relay) and the lean client's (to an https API)."""
    from agent.executor import _lean_ssl_context
    from agent.link import ssl_context
    from backhaul.sslobject import DirectSSLObject

    for verify in (True, False):
        cfg = make_config(upstream={"verify": verify})
        assert ssl_context(cfg).sslobject_class is DirectSSLObject
        assert _lean_ssl_context(cfg).sslobject_class is DirectSSLObject
