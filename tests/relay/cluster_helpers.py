"""Gateway members in process: a real agent Dispatcher (with its keyring) joined to the
relay's hub by a real Tunnel pair over an in-memory pipe, so key rotation runs end to end
without sockets or processes."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.dispatch import Dispatcher
from agent.keyring import Keyring
from agent.state import AgentState
from backhaul import handshake
from backhaul.aio.tunnel import TransportClosed, Tunnel
from backhaul.seal import GatewayKeyPair
from backhaul.wire import Connection, HelloReceived, Role, WelcomeReceived
from relay import rotation
from relay.hub import Hub, LiveTunnel

_CLOSED = object()


class Pipe:
    """Both directions of one in-memory WebSocket."""

    def __init__(self) -> None:
        self.queues: tuple[asyncio.Queue[Any], asyncio.Queue[Any]] = (
            asyncio.Queue(),
            asyncio.Queue(),
        )
        self.closed = False
        self.ends = (PipeEnd(self, 0), PipeEnd(self, 1))

    def shut(self) -> None:
        if not self.closed:
            self.closed = True
            for queue in self.queues:
                queue.put_nowait(_CLOSED)


class PipeEnd:
    def __init__(self, pipe: Pipe, side: int) -> None:
        self.pipe = pipe
        self.inbox = pipe.queues[side]
        self.outbox = pipe.queues[1 - side]

    async def recv(self) -> bytes:
        if self.pipe.closed:
            raise TransportClosed("closed")
        item = await self.inbox.get()
        if item is _CLOSED:
            raise TransportClosed("closed")
        data: bytes = item
        return data

    async def send(self, data: bytes) -> None:
        if self.pipe.closed:
            raise TransportClosed("closed")
        await asyncio.sleep(0)
        self.outbox.put_nowait(bytes(data))

    async def close(self, code: int, reason: str) -> None:
        self.pipe.shut()


@dataclass
class Member:
    member_id: str
    gateway_id: str
    keyring: Keyring
    live: LiveTunnel
    pipe: Pipe
    hub: Hub
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        self.hub.unregister(self.live)
        self.pipe.shut()
        for task in self.tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(5):
                    await task


def keyring_in(directory: Path, key: GatewayKeyPair, version: int = 1) -> Keyring:
    return Keyring.create(directory / "keys" / "gateway.key", key, version)


async def connect(
    app_state: Any,
    member_id: str,
    gateway_id: str,
    keyring: Keyring,
    *,
    announce: bool = True,
) -> Member:
    """Connect a member to the relay's hub; ``announce`` runs the tunnel's post-handshake
    hook (relay.rotation.after_handshake), as relay/tunnel.py does."""
    pipe = Pipe()
    relay = Tunnel(Connection(Role.RELAY), pipe.ends[0], ping_interval=60, ping_timeout=120)
    state = AgentState(relay="https://relay.test", member_id=member_id, gateway_id=gateway_id)
    dispatcher = Dispatcher(None, keyring, state)  # type: ignore[arg-type]  # ops only
    agent = Tunnel(
        Connection(Role.AGENT),
        pipe.ends[1],
        ping_interval=60,
        ping_timeout=120,
        on_stream=dispatcher.handle,
    )
    signing = ed25519.Ed25519PrivateKey.generate()

    async def relay_side() -> None:
        relay.conn.send_hello(handshake.relay_hello(handshake.new_challenge()))
        await relay.flush()
        while not any(isinstance(e, HelloReceived) for e in await relay.receive_events()):
            pass
        relay.conn.send_welcome({"session_id": "ses_test", "member_id": member_id})
        await relay.flush()

    async def agent_side() -> None:
        events = await agent.receive_events()
        hello = next(e for e in events if isinstance(e, HelloReceived))
        agent.conn.send_hello(
            handshake.agent_hello(hello.payload, signing, member_id, gateway_id, "host")
        )
        await agent.flush()
        while not any(isinstance(e, WelcomeReceived) for e in await agent.receive_events()):
            pass

    async with asyncio.timeout(5):
        await asyncio.gather(relay_side(), agent_side())
    live = LiveTunnel(
        member_id=member_id,
        gateway_id=gateway_id,
        session_id="ses_test",
        version="0.1.0",
        hostname=f"{member_id}.test",
        tunnel=relay,
    )
    hub: Hub = app_state.hub
    hub.register(live)
    member = Member(member_id, gateway_id, keyring, live, pipe, hub)
    member.tasks = [asyncio.create_task(relay.run()), asyncio.create_task(agent.run())]
    if announce:
        await rotation.after_handshake(app_state, live)
    return member
