"""The agent's link to the relay: connect out, prove who we are, serve, reconnect.

The agent only ever dials out (``wss://<relay>/v1/tunnel``), verifies the relay's certificate
against the CA file or the system store *and* the fingerprint pinned at enrollment, answers
the relay's challenge with the member's Ed25519 signature, then serves streams until the
tunnel drops; it comes back with exponential backoff and full jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric import ed25519
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

from agent import metrics
from agent.backoff import backoff, should_retry
from agent.config import AgentConfig, tunnel_url
from agent.load import report_load
from agent.proxy import connect_options
from agent.state import AgentState
from backhaul import handshake
from backhaul.aio.tunnel import TransportClosed, Tunnel, TunnelStream
from backhaul.aio.wsframes import binary_frame
from backhaul.aio.wsreader import install, is_open
from backhaul.aio.wssplit import FrameSplitter, limit_of
from backhaul.keys import fingerprint
from backhaul.sslobject import direct_records
from backhaul.version import SUBPROTOCOL, __version__
from backhaul.wire import (
    CLOSE_CODE_BASE,
    Connection,
    ErrorCode,
    HelloReceived,
    Role,
    Settings,
    WelcomeReceived,
)
from backhaul.wire.frames import BulkMessage

log = structlog.get_logger("backhaul.agent.link")

#: First pause before an additional tunnel tries again after reaching a taken worker.
ADDITIONAL_RETRY_SECONDS = 0.2
#: Most tunnels the agent holds to one relay address, whatever WELCOME says.
MAX_WORKERS = 64


class LinkRefused(Exception):
    """The relay refused this member for good (revoked, unknown, bad signature)."""


class TunnelClientConnection(ClientConnection):
    """websockets' client connection for the tunnel: whole binary messages cut out of the
    received bytes by a :class:`FrameSplitter` once the opening handshake is done, other
    frames parsed by websockets out of a :class:`ChunkReader`, and binary messages written
    by :meth:`send_message`."""

    def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
        install(protocol)
        super().__init__(protocol, **kwargs)
        self._feed: Callable[[bytes], bool] | None = None
        #: The last bytes of the handshake's response seen so far (its end may straddle
        #: two reads); None once the handshake is over.
        self._head_tail: bytes | None = b""
        self._splitter: FrameSplitter | None = None

    def data_received(self, data: bytes) -> None:
        """The opening handshake's response goes to websockets alone, cut at its end.

        A 101 response has no body (RFC 9110 §15.2), so it ends at its first empty line,
        and the relay's first frames may follow it in the same read. websockets reads
        exactly the head; if that opened the connection, its parser waits at the first
        frame's first byte, and a splitter takes over from there. Any other outcome (a
        refusal, a malformed response) leaves every byte to websockets.
        """
        splitter = self._splitter
        if splitter is not None:
            splitter.feed(data)
            if splitter.done:
                self._splitter = None
            return
        tail = self._head_tail
        if tail is None:
            super().data_received(data)
            return
        end = (tail + data).find(b"\r\n\r\n")
        if end < 0:
            self._head_tail = (tail + data)[-3:]
            super().data_received(data)
            return
        self._head_tail = None
        cut = end + 4 - len(tail)
        super().data_received(data[:cut])
        protocol = self.protocol
        if (
            protocol.state is State.OPEN
            and protocol.parser_exc is None
            and not len(protocol.reader)  # type: ignore[arg-type]
        ):
            limit = limit_of(protocol.max_message_size, protocol.max_fragment_size)
            self._splitter = FrameSplitter(False, limit, self._message, self._frame)
            if cut < len(data):
                self.data_received(data[cut:])
        elif cut < len(data):
            super().data_received(data[cut:])

    def _message(self, payload: bytes) -> bool:
        """A whole binary message for the feed, if it pushes and nothing waits ahead of
        the message in websockets' queue; declined otherwise (websockets queues it)."""
        feed = self._feed
        if feed is None:
            return False
        protocol = self.protocol
        if protocol.current_size is not None or not is_open(protocol):
            return False
        recv = getattr(self, "recv_messages", None)  # as _queued(), without its call
        return not (recv and recv.frames.queue) and feed(payload)

    def _frame(self, raw: bytes) -> bool:
        """Any other frame, or what follows the splitter's end, parsed by websockets."""
        super().data_received(raw)
        protocol = self.protocol
        return is_open(protocol) and protocol.parser_exc is None

    def push_to(self, feed: Callable[[bytes], bool]) -> bool:
        """Hand binary messages to ``feed`` as they are parsed, instead of to the queue that
        ``recv`` reads (``backhaul.aio.tunnel.MessageTransport``), if none wait there; one
        that ``feed`` refuses goes to the queue."""
        if self._queued():
            return False
        self._feed = feed
        return True

    def process_event(self, event: Event) -> None:
        feed = self._feed
        if (
            feed is not None
            and isinstance(event, Frame)
            and event.opcode is Opcode.BINARY
            and event.fin
            and not self._queued()
        ):
            data = event.data
            if feed(data if type(data) is bytes else bytes(data)):
                return
        super().process_event(event)

    def _queued(self) -> bool:
        """Frames wait in websockets' message queue (a message, or part of one)."""
        return bool(getattr(self, "recv_messages", None) and self.recv_messages.frames.queue)

    async def send_message(self, data: bytes | BulkMessage) -> None:
        """One binary message, framed and masked here and handed to the transport.

        What ``send`` does for a message while the connection is open, without its context
        manager, its checks for text and fragments, and the copy of the frame into one
        buffer: a bulk message leaves as its header and its masked payload. Anything but an
        open connection takes ``send``, which raises as websockets does.
        """
        if not self.write_message(data):
            await self.send(data.join() if isinstance(data, BulkMessage) else data)
            return
        if self.paused:
            await self.drain()

    def write_message(self, data: bytes | BulkMessage) -> bool:
        """:meth:`send_message`'s own part: ``data`` framed and handed to the transport
        while the connection is open and no fragmented send is under way; False otherwise,
        with nothing written."""
        if not is_open(self.protocol) or self.send_in_progress is not None:
            return False
        self.transport.writelines(binary_frame(data, masked=True))
        return True


class WebSocketTransport:
    """A ``websockets`` client connection as a MessageTransport."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._write = ws.write_message if isinstance(ws, TunnelClientConnection) else None

    def push_to(self, feed: Callable[[bytes], bool]) -> bool:
        """``backhaul.aio.tunnel.MessageTransport``'s push, when the connection offers it."""
        return isinstance(self.ws, TunnelClientConnection) and self.ws.push_to(feed)

    async def recv(self) -> bytes:
        try:
            message = await self.ws.recv()
        except ConnectionClosed as exc:
            raise _closed(exc) from exc
        if isinstance(message, str):
            await self.close(1003, "binary messages only")
            raise TransportClosed("relay sent a text message")
        return message

    async def send(self, data: bytes | BulkMessage) -> None:
        """What :meth:`TunnelClientConnection.send_message` does, in one coroutine, not two.
        A bulk DATA message (:meth:`send_bulk`) is framed in its two parts."""
        ws = self.ws
        try:
            if self._write is not None and self._write(data):
                if ws.paused:
                    await ws.drain()
            else:
                await ws.send(data.join() if isinstance(data, BulkMessage) else data)
        except ConnectionClosed as exc:
            raise _closed(exc) from exc

    async def send_bulk(self, message: BulkMessage) -> None:
        """A bulk DATA message, written in its two parts (MessageTransport)."""
        await self.send(message)

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)


def _closed(exc: ConnectionClosed) -> TransportClosed:
    """Why the WebSocket ended, from whichever side closed it (RFC 6455 §7.1.5)."""
    if exc.rcvd is not None:
        return TransportClosed(exc.rcvd.reason or "relay closed the tunnel", exc.rcvd.code)
    if exc.sent is not None:  # we closed it: say why (e.g. 1009, a message too big)
        reason = exc.sent.reason or "no reason"
        return TransportClosed(f"closed by the agent: {reason} ({exc.sent.code})")
    return TransportClosed("connection lost")


def ssl_context(cfg: AgentConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return direct_records(ctx)


def check_pin(ws: ClientConnection, pinned: str | None) -> None:
    """Refuse a relay whose certificate is not the one pinned at enrollment."""
    if pinned is None:
        return
    ssl_object = ws.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der is None:
        raise LinkRefused("the relay presented no certificate to check against the pin")
    seen = fingerprint(der)
    if seen != pinned:
        raise LinkRefused(
            f"relay certificate {seen} does not match the pinned {pinned}; "
            "re-enroll if the relay's certificate was replaced"
        )


class Link:
    """Keeps one tunnel open until ``stop`` is set."""

    def __init__(
        self,
        cfg: AgentConfig,
        signing_key: ed25519.Ed25519PrivateKey,
        state: AgentState,
        on_stream: Callable[[TunnelStream], Awaitable[None]],
        settings: Settings | None = None,
        additional: bool = False,
    ) -> None:
        self.cfg = cfg
        self.key = signing_key
        self.state = state
        self.on_stream = on_stream
        self.settings = settings or Settings(max_streams=cfg.tunnel.max_concurrent_streams)
        self._ssl: tuple[object, ssl.SSLContext] | None = None
        self._served = False
        #: One more tunnel of this member, to another worker of the relay (agent.spread).
        self.additional = additional
        #: Told the relay's worker count by each WELCOME (set by the service; not on an
        #: additional link).
        self.on_workers: Callable[[str, int], None] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Connect to the relays in order of preference; back off once all have failed."""
        tunnel_cfg = self.cfg.tunnel
        delays = backoff(tunnel_cfg.backoff_initial_seconds, tunnel_cfg.backoff_max_seconds)
        relays = self.cfg.relays
        index = 0
        while not stop.is_set():
            close_code: int | None = None
            url = relays[index % len(relays)]
            self.state.relay = url
            try:
                closed = await self._attempt(url, stop)
            except LinkRefused as refused:
                self.state.last_error = str(refused)
                log.error("link.refused", relay=url, reason=str(refused))
                raise
            if closed is not None:
                close_code = closed.code
                self._failed(url, _ended(closed))
            if stop.is_set():
                break
            if close_code is not None and not should_retry(close_code):
                raise LinkRefused(self.state.last_error or "relay refused this member")
            if self._served:
                # A tunnel that worked: start again from the preferred relay, fresh backoff.
                index = 0
                delays = backoff(tunnel_cfg.backoff_initial_seconds, tunnel_cfg.backoff_max_seconds)
            else:
                index += 1
                if index % len(relays):
                    continue  # try the next relay at once; back off only after a full round
            delay = next(delays)
            self.state.reconnects += 1
            metrics.RECONNECTS.inc()
            log.info("link.reconnecting", in_seconds=round(delay, 2))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    async def run_additional(self, url: str, stop: asyncio.Event) -> None:
        """Keep one additional tunnel to ``url`` open until ``stop`` is set. A relay worker
        that holds one of this member's tunnels already turns it away, and it tries again
        soon (the kernel gives each new connection to any of the workers), backing off the
        longer the more often that happens in a row."""
        tunnel_cfg = self.cfg.tunnel
        self.state.relay = url
        delays = backoff(ADDITIONAL_RETRY_SECONDS, tunnel_cfg.backoff_max_seconds)
        while not stop.is_set():
            try:
                closed = await self._attempt(url, stop)
            except LinkRefused as refused:  # the main link reports it and stops the agent
                self.state.last_error = str(refused)
                return
            if closed is not None:
                if closed.code == CLOSE_CODE_BASE + ErrorCode.ALREADY_CONNECTED:
                    log.debug("link.worker_taken", relay=url)
                elif not should_retry(closed.code):
                    return
                else:
                    self._failed(url, _ended(closed))
            if stop.is_set():
                break
            if self._served:
                delays = backoff(ADDITIONAL_RETRY_SECONDS, tunnel_cfg.backoff_max_seconds)
            self.state.reconnects += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next(delays)):
                    await stop.wait()

    async def _attempt(self, url: str, stop: asyncio.Event) -> TransportClosed | None:
        """One connection to ``url``, served until it ends. A failure to connect is recorded
        here; a tunnel that closed is returned, for the caller to judge its close code.
        LinkRefused (the pin, the relay's refusal) goes to the caller."""
        self._served = False
        try:
            await self._connect_and_serve(url, stop)
        # One name per handler: mypyc gives a name one type for the whole function.
        except TransportClosed as closed:
            return closed
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError, ssl.SSLError) as broken:
            self._failed(url, _describe(broken))
        except handshake.HandshakeRefused as turned_down:
            self._failed(url, f"handshake failed: {turned_down.reason}")
        return None

    def _failed(self, url: str, reason: str) -> None:
        self.state.last_error = reason
        log.warning("link.down", relay=url, reason=reason)

    def _ssl_context(self) -> ssl.SSLContext:
        """The TLS context, built once and again only when the CA file changes: building
        one (loading the trust store) costs more than the handshake it is used for."""
        ca_file = self.cfg.ca_file
        try:
            version: object = (ca_file, ca_file.stat().st_mtime_ns) if ca_file else None
        except OSError:
            version = (ca_file, None)
        if self._ssl is None or self._ssl[0] != version:
            self._ssl = (version, ssl_context(self.cfg))
        return self._ssl[1]

    async def _connect_and_serve(self, relay_url: str, stop: asyncio.Event) -> None:
        cfg = self.cfg
        url = tunnel_url(relay_url)
        secure = url.startswith("wss://")
        async with connect(
            url,
            **await connect_options(cfg, url),  # the corporate proxy, when one is configured
            ssl=self._ssl_context() if secure else None,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,
            max_size=self.settings.max_message,
            max_queue=64,
            open_timeout=cfg.tunnel.ping_timeout_seconds,
            ping_interval=None,
            close_timeout=5,
            user_agent_header=f"backhaul-agent/{__version__}",
            create_connection=TunnelClientConnection,
        ) as ws:
            if secure:
                check_pin(ws, cfg.pinned_fingerprint)
            transport = WebSocketTransport(ws)
            tunnel = Tunnel(
                Connection(Role.AGENT, self.settings),
                transport,
                ping_interval=cfg.tunnel.ping_interval_seconds,
                ping_timeout=cfg.tunnel.ping_timeout_seconds,
                on_stream=self.on_stream,
                logger=log,
            )
            async with asyncio.timeout(cfg.tunnel.ping_timeout_seconds):
                welcome = await self._handshake(tunnel)
            await self._serve(tunnel, welcome, stop)

    async def _handshake(self, tunnel: Tunnel) -> dict[str, Any]:
        events = await tunnel.receive_events()
        hello = next((e for e in events if isinstance(e, HelloReceived)), None)
        if hello is None:
            raise handshake.HandshakeRefused(ErrorCode.PROTOCOL_ERROR, "relay sent no HELLO")
        tunnel.conn.send_hello(
            handshake.agent_hello(
                hello.payload,
                self.key,
                self.cfg.member_id,
                self.cfg.gateway_id,
                socket.gethostname(),
                additional=self.additional,
            )
        )
        await tunnel.flush()
        while True:
            for event in await tunnel.receive_events():
                if isinstance(event, WelcomeReceived):
                    return event.payload

    async def _serve(self, tunnel: Tunnel, welcome: dict[str, Any], stop: asyncio.Event) -> None:
        self._served = True
        state = self.state
        state.tunnel = tunnel
        state.session_id = str(welcome.get("session_id", ""))
        state.connected_since = dt.datetime.now(dt.UTC)
        state.last_error = None
        log.info(
            "link.connected",
            relay=state.relay,
            session_id=state.session_id,
            **({"additional": True} if self.additional else {}),
        )
        if self.on_workers is not None:
            self.on_workers(state.relay, _workers(welcome))
        runner = asyncio.create_task(tunnel.run())
        reporter = asyncio.create_task(report_load(tunnel, self.cfg.tunnel.load_report_seconds))
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set() and not tunnel.closed:
                await self._drain(tunnel)
            await runner
        finally:
            stopper.cancel()
            runner.cancel()
            reporter.cancel()
            if tunnel.closed and tunnel.close_reason and not stop.is_set():
                state.last_error = f"tunnel closed: {tunnel.close_reason}"
        if not stop.is_set():
            raise TransportClosed(tunnel.close_reason or "tunnel closed")

    async def _drain(self, tunnel: Tunnel) -> None:
        """SIGTERM: GOAWAY, let in-flight streams finish within the grace period, close."""
        self.state.draining = True
        grace = self.cfg.tunnel.shutdown_grace_seconds
        log.info("link.draining", inflight=tunnel.inflight, grace_seconds=grace)
        with contextlib.suppress(TransportClosed):
            await tunnel.goaway("agent shutting down")
        drained = await tunnel.drain(grace)
        if not drained:
            log.warning("link.drain_timeout", abandoned=tunnel.inflight)
        await tunnel.close(ErrorCode.NO_ERROR, "agent shut down")


def _workers(welcome: dict[str, Any]) -> int:
    """The relay's worker processes on this address, from WELCOME (1 when not said)."""
    workers = welcome.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        return 1
    return min(workers, MAX_WORKERS)


def _ended(closed: TransportClosed) -> str:
    return f"tunnel closed: {closed.reason or 'connection lost'}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"relay certificate not trusted: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "timed out connecting to the relay"
    if isinstance(exc, InvalidHandshake):
        return f"WebSocket upgrade refused: {exc}"
    return f"{type(exc).__name__}: {exc}"
