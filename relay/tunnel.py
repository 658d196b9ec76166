"""The ``/v1/tunnel`` WebSocket endpoint: authenticate an agent, then serve its tunnel.

Binary messages only (RFC 6455 §5.6), subprotocol ``backhaul.v1``, no compression (secrets
travel inside; compression would expose them to length side channels, as CRIME did for TLS).
A member is refused before any stream exists when it is unknown, revoked, or fails the
signature check; the close code is ``4000 + ErrorCode`` with a reason the agent logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from backhaul import handshake
from backhaul.aio.background import Background
from backhaul.aio.tunnel import TransportClosed, Tunnel
from backhaul.keys import verify_signature
from backhaul.version import SUBPROTOCOL
from backhaul.wire import CLOSE_CODE_BASE, Connection, ErrorCode, HelloReceived, Role
from backhaul.wire.frames import BulkMessage
from relay import metrics, probe, rotation
from relay.hub import Hub, LiveTunnel
from relay.registry import Registry
from relay.store import queries
from relay.wsprotocol import PUSH_TO, SEND_MESSAGE

router = APIRouter()
log = structlog.get_logger("backhaul.relay.tunnel")

TUNNEL_PATH = "/v1/tunnel"


async def _tunnel_over(data: bytes) -> None:
    raise TransportClosed("tunnel over")


class StarletteTransport:
    """A Starlette WebSocket as a :class:`backhaul.aio.tunnel.MessageTransport`."""

    def __init__(self, ws: WebSocket) -> None:
        #: None once :meth:`release` has let go of the connection.
        self.ws: WebSocket | None = ws
        #: Sends one binary message: through the ASGI WebSocket, or once :meth:`accelerate`
        #: finds the protocol's own ``send_message`` (compiled), that itself, without an
        #: interpreted coroutine of this class per message. The tunnel's flush turns what it
        #: raises (``ClientDisconnected``, an OSError) into TransportClosed.
        self.send: Callable[[bytes], Coroutine[Any, Any, None]] = self._send_asgi
        #: The protocol's ``send_message`` once :meth:`accelerate` finds it: it takes a bulk
        #: DATA message in its two parts (:meth:`send_bulk`).
        self._send_message: Callable[[bytes | BulkMessage], Coroutine[Any, Any, None]] | None = None
        self._push_to: Callable[[Callable[[bytes], bool]], bool] | None = None

    def accelerate(self) -> None:
        """From now on (the handshake is over), binary messages go straight to the
        WebSocket protocol when the server offers that (relay.wsprotocol), and received
        ones may come straight from it (:meth:`push_to`)."""
        extensions = self.ws.scope.get("extensions", {}) if self.ws is not None else {}
        send_message: Callable[[bytes | BulkMessage], Coroutine[Any, Any, None]] | None = (
            extensions.get(SEND_MESSAGE)
        )
        if send_message is not None:
            self.send = send_message
            self._send_message = send_message
        self._push_to = extensions.get(PUSH_TO)

    def push_to(self, feed: Callable[[bytes], bool]) -> bool:
        """``backhaul.aio.tunnel.MessageTransport``'s push, when the protocol offers it."""
        return self._push_to is not None and bool(self._push_to(feed))

    async def recv(self) -> bytes:
        if self.ws is None:
            raise TransportClosed("tunnel over")
        try:
            message = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError) as exc:
            raise TransportClosed("agent disconnected") from exc
        if message["type"] == "websocket.disconnect":
            raise TransportClosed(f"agent closed the tunnel ({message.get('code')})")
        data = message.get("bytes")
        if data is None:
            await self.close(1003, "binary messages only")
            raise TransportClosed("agent sent a text message")
        return bytes(data)

    async def send_bulk(self, message: BulkMessage) -> None:
        """A bulk DATA message: its two parts straight to the protocol when it takes them."""
        send_message = self._send_message
        if send_message is not None:
            await send_message(message)
        else:
            await self.send(message.join())

    async def _send_asgi(self, data: bytes) -> None:
        if self.ws is None:
            raise TransportClosed("tunnel over")
        try:
            await self.ws.send_bytes(data)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise TransportClosed("agent disconnected") from exc

    async def close(self, code: int, reason: str) -> None:
        if self.ws is None:
            return
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)

    def release(self) -> None:
        """Let go of the connection once the tunnel is over: the tunnel's own objects refer
        to each other (its streams, its timer), and through this transport they would keep
        the connection, its TLS object and buffers, until a full collection."""
        self.send = _tunnel_over  # not a method of its own: that would refer back to it
        self._send_message = None
        self._push_to = None
        self.ws = None


#: Additional tunnels being retired after a main tunnel took their place (``_retire``);
#: cancelled when the relay stops.
retiring = Background()
#: Why an additional tunnel of a member is turned away (``agent.spread`` tries again).
_HELD = "this relay worker already holds a tunnel of the member"


@router.websocket(TUNNEL_PATH)
async def tunnel_endpoint(ws: WebSocket) -> None:
    if SUBPROTOCOL not in ws.scope.get("subprotocols", []):
        await ws.close(1002, f"subprotocol {SUBPROTOCOL} required")
        return
    await ws.accept(subprotocol=SUBPROTOCOL)
    transport = StarletteTransport(ws)
    try:
        await _serve(ws, transport)
    finally:
        transport.release()


async def _serve(ws: WebSocket, transport: StarletteTransport) -> None:
    """The tunnel on an accepted connection: the handshake, then the tunnel until it ends."""
    config = ws.app.state.config
    hub: Hub = ws.app.state.hub
    interval = float(config.ping_interval_seconds)
    tunnel = Tunnel(
        Connection(Role.RELAY),
        transport,
        ping_interval=interval,
        ping_timeout=2 * interval,
        logger=log,
    )
    try:
        async with asyncio.timeout(float(config.handshake_timeout_seconds)):
            live = await _handshake(ws, tunnel)
    except TimeoutError:
        log.warning("tunnel.handshake_timeout", client=_peer(ws))
        await transport.close(CLOSE_CODE_BASE + ErrorCode.PROTOCOL_ERROR, "handshake timeout")
        return
    except TransportClosed:
        return
    except handshake.HandshakeRefused as exc:
        if exc.code is ErrorCode.ALREADY_CONNECTED:  # expected while an agent spreads out
            log.info("tunnel.already_connected", client=_peer(ws), reason=exc.reason)
        else:
            log.warning("tunnel.refused", client=_peer(ws), reason=exc.reason, code=exc.code.name)
        await tunnel.close(exc.code, exc.reason)
        return
    except probe.Probe as exc:  # backhaul-agent diagnose: proven, answered, never routed to
        log.info("tunnel.probe", member_id=exc.member_id, client=_peer(ws))
        await probe.serve(tunnel)
        return
    if live.additional and hub.live(live.member_id) is not None:
        # The member's agent opens one tunnel per worker; this one reached a worker that has
        # one, so the agent tries again rather than replace it. No await since the check.
        log.info("tunnel.already_connected", member_id=live.member_id, client=_peer(ws))
        await tunnel.close(ErrorCode.ALREADY_CONNECTED, _HELD)
        return
    transport.accelerate()  # after WELCOME, which the handshake gate watches for
    previous = hub.register(live)
    metrics.TUNNEL_CONNECTS.inc()
    if previous is not None:
        if previous.additional:
            # The agent's main tunnel came back on a worker that held one of its additional
            # tunnels: new streams take the main one, those in flight finish on the other.
            retiring.spawn(_retire(previous, config.invoke_timeout_max_seconds), "retire")
        else:
            await previous.tunnel.close(ErrorCode.NO_ERROR, "replaced by a newer tunnel")
    registry: Registry = ws.app.state.registry
    await _quietly(registry.announce(live))
    tunnel.on_goaway = lambda: log.info("tunnel.draining", member_id=live.member_id)
    tunnel.on_notice = lambda payload: _on_notice(live, payload)
    tunnel.log = log.bind(member_id=live.member_id, session_id=live.session_id)
    tunnel.log.info("tunnel.connected", gateway_id=live.gateway_id, version=live.version)
    # Key rotation: hand over a gateway key this member missed (returns at once).
    await rotation.after_handshake(ws.app.state, live)
    try:
        await tunnel.run()
    finally:
        hub.unregister(live)
        await _quietly(registry.withdraw(live))
        tunnel.log.info("tunnel.disconnected", reason=tunnel.close_reason)
        await transport.close(1000, "")


async def _retire(live: LiveTunnel, grace: float) -> None:
    """GOAWAY, the streams in flight finish (within ``grace``), close: the agent's additional
    tunnel then tries again and reaches another worker."""
    tunnel = live.tunnel
    with contextlib.suppress(TransportClosed):
        await tunnel.goaway("replaced by the member's main tunnel")
        await tunnel.drain(grace)
        await tunnel.close(ErrorCode.NO_ERROR, "replaced by the member's main tunnel")


async def _handshake(ws: WebSocket, tunnel: Tunnel) -> LiveTunnel:
    challenge = handshake.new_challenge()
    tunnel.conn.send_hello(handshake.relay_hello(challenge))
    await tunnel.flush()
    events = await tunnel.receive_events()
    hello = next((e for e in events if isinstance(e, HelloReceived)), None)
    if hello is None:
        raise handshake.HandshakeRefused(ErrorCode.PROTOCOL_ERROR, "expected HELLO")
    claim = handshake.parse_agent_hello(hello.payload)
    async with ws.app.state.db() as session:
        member = await queries.member_for_handshake(session, claim.member_id)
        if member is None or member.gateway_id != claim.gateway_id:
            raise handshake.HandshakeRefused(ErrorCode.UNAUTHORIZED, "unknown member")
        if member.revoked:
            raise handshake.HandshakeRefused(ErrorCode.UNAUTHORIZED, "member revoked")
        message = handshake.transcript(challenge, claim.member_id, claim.gateway_id, claim.version)
        if not verify_signature(member.signing_public_key, claim.signature, message):
            raise handshake.HandshakeRefused(ErrorCode.UNAUTHORIZED, "bad signature")
        await queries.touch_member(session, member.id, claim.agent_version, claim.hostname)
    if claim.additional and ws.app.state.hub.live(member.id) is not None:
        raise handshake.HandshakeRefused(ErrorCode.ALREADY_CONNECTED, _HELD)
    session_id = "ses_" + secrets.token_hex(8)
    welcome: dict[str, Any] = {
        "session_id": session_id,
        "member_id": member.id,
        "ping_interval": tunnel.ping_interval,
    }
    workers: int = ws.app.state.workers
    if workers > 1:
        welcome["workers"] = workers
    tunnel.conn.send_welcome(welcome)
    await tunnel.flush()
    if claim.probe:
        raise probe.Probe(member.id, session_id)
    return LiveTunnel(
        member_id=member.id,
        gateway_id=member.gateway_id,
        session_id=session_id,
        version=claim.agent_version,
        hostname=claim.hostname,
        tunnel=tunnel,
        priority=member.priority,
        disabled=member.disabled,
        instance_id=ws.app.state.hub.instance_id,
        additional=claim.additional,
    )


def _percent(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100:
        return float(value)
    return None


def _on_notice(live: LiveTunnel, payload: dict[str, Any]) -> None:
    """Agent → relay notices: today, the member's host load for the thresholds."""
    if payload.get("kind") == "load":
        live.cpu = _percent(payload.get("cpu"))
        live.memory = _percent(payload.get("memory"))


async def _quietly(call: Awaitable[None]) -> None:
    """Registry updates must never take a tunnel down (Redis may be briefly unreachable)."""
    try:
        await call
    except Exception as exc:
        log.warning("tunnel.registry_failed", error=str(exc))


def _peer(ws: WebSocket) -> str:
    client = ws.client
    return f"{client.host}:{client.port}" if client else "?"
