"""The asyncio adapter over an in-memory message pipe, and once over a real WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from backhaul import handshake
from backhaul.aio.tunnel import (
    BATCH_LEAVES_AT,
    StreamError,
    TransportClosed,
    Tunnel,
    TunnelStream,
)
from backhaul.keys import public_key_text, verify_signature
from backhaul.version import SUBPROTOCOL
from backhaul.wire import (
    CLOSE_CODE_BASE,
    Connection,
    ErrorCode,
    HelloReceived,
    Phase,
    Role,
    Settings,
    StreamUnavailable,
    WelcomeReceived,
)
from backhaul.wire import frames as f
from tests.cycles import collector_off, wait_until_freed

pytestmark = pytest.mark.timeout(60)

MEMBER = "mem_test"
GATEWAY = "gw_test"
#: Small windows, so that flow control is exercised by bodies of a few hundred KiB.
SMALL = Settings(stream_window=64 * 1024, tunnel_window=256 * 1024, max_data=16 * 1024)
MiB = 1024 * 1024


# ---------------------------------------------------------------- an in-memory transport

_CLOSED = object()


class Link:
    """Both directions of one in-memory connection, and how it was closed; ``pushing``
    ends hand messages to the tunnel's feed, as the relay's and the agent's do."""

    def __init__(self, pushing: bool = False) -> None:
        self.queues: tuple[asyncio.Queue[Any], asyncio.Queue[Any]] = (
            asyncio.Queue(),
            asyncio.Queue(),
        )
        self.closed: tuple[int, str] | None = None
        end = PushingTransport if pushing else MemoryTransport
        self.ends = (end(self, 0), end(self, 1))

    def shut(self, code: int, reason: str) -> None:
        """Close both directions at once, like a dropped TCP connection."""
        if self.closed is None:
            self.closed = (code, reason)
            for queue in self.queues:
                queue.put_nowait(_CLOSED)


class MemoryTransport:
    """One end of a :class:`Link`: a MessageTransport over two asyncio queues."""

    def __init__(self, link: Link, side: int) -> None:
        self.link = link
        self.side = side
        self.inbox = link.queues[side]
        self.outbox = link.queues[1 - side]
        self.close_calls: list[tuple[int, str]] = []

    def _closed_error(self) -> TransportClosed:
        assert self.link.closed is not None
        code, reason = self.link.closed
        return TransportClosed(reason or "closed", code)

    async def recv(self) -> bytes:
        if self.link.closed is not None:
            raise self._closed_error()
        item = await self.inbox.get()
        if item is _CLOSED:
            raise self._closed_error()
        data: bytes = item
        return data

    async def send(self, data: bytes) -> None:
        if self.link.closed is not None:
            raise self._closed_error()
        await asyncio.sleep(0)  # let the other side run, as a socket write would
        self.outbox.put_nowait(bytes(data))

    async def close(self, code: int, reason: str) -> None:
        self.close_calls.append((code, reason))
        self.link.shut(code, reason)


class PushingTransport(MemoryTransport):
    """A MemoryTransport that pushes (``MessageTransport.push_to``): a message goes to the
    receiving tunnel's feed when none waits in that end's queue, and to the queue if one
    does or the tunnel has not asked."""

    def __init__(self, link: Link, side: int) -> None:
        super().__init__(link, side)
        self.feed: Callable[[bytes], bool] | None = None
        self.pushed = 0

    def push_to(self, feed: Callable[[bytes], bool]) -> bool:
        if not self.inbox.empty():
            return False
        self.feed = feed
        return True

    async def send(self, data: bytes) -> None:
        if self.link.closed is not None:
            raise self._closed_error()
        await asyncio.sleep(0)
        peer = self.link.ends[1 - self.side]
        assert isinstance(peer, PushingTransport)
        if peer.feed is not None and peer.inbox.empty() and peer.feed(bytes(data)):
            peer.pushed += 1
        else:
            self.outbox.put_nowait(bytes(data))


# ---------------------------------------------------------------- handshake and pairs


async def relay_handshake(tunnel: Tunnel, public_key: str) -> handshake.AgentClaim:
    """The relay's side, as relay/tunnel.py does it, with one known member."""
    challenge = handshake.new_challenge()
    tunnel.conn.send_hello(handshake.relay_hello(challenge))
    await tunnel.flush()
    events = await tunnel.receive_events()
    hello = next((e for e in events if isinstance(e, HelloReceived)), None)
    if hello is None:
        raise handshake.HandshakeRefused(ErrorCode.PROTOCOL_ERROR, "expected HELLO")
    claim = handshake.parse_agent_hello(hello.payload)
    message = handshake.transcript(challenge, claim.member_id, claim.gateway_id, claim.version)
    if not verify_signature(public_key, claim.signature, message):
        raise handshake.HandshakeRefused(ErrorCode.UNAUTHORIZED, "bad signature")
    tunnel.conn.send_welcome({"session_id": "ses_test", "member_id": claim.member_id})
    await tunnel.flush()
    return claim


async def agent_handshake(tunnel: Tunnel, key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    events = await tunnel.receive_events()
    hello = next(e for e in events if isinstance(e, HelloReceived))
    tunnel.conn.send_hello(handshake.agent_hello(hello.payload, key, MEMBER, GATEWAY, "host"))
    await tunnel.flush()
    while True:
        for event in await tunnel.receive_events():
            if isinstance(event, WelcomeReceived):
                return event.payload


Handler = Callable[[TunnelStream], Awaitable[None]]


@dataclass
class Pair:
    link: Link
    relay: Tunnel
    agent: Tunnel
    welcome: dict[str, Any]
    claim: handshake.AgentClaim
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, *, relay: bool = True, agent: bool = True) -> None:
        if relay:
            self.tasks.append(asyncio.create_task(self.relay.run()))
        if agent:
            self.tasks.append(asyncio.create_task(self.agent.run()))


@contextlib.asynccontextmanager
async def tunnel_pair(
    on_stream: Handler | None = None,
    *,
    relay_settings: Settings | None = None,
    agent_settings: Settings | None = None,
    relay_kw: dict[str, Any] | None = None,
    agent_kw: dict[str, Any] | None = None,
    run_agent: bool = True,
    pushing: bool = False,
) -> AsyncIterator[Pair]:
    link = Link(pushing)
    key = ed25519.Ed25519PrivateKey.generate()
    relay = Tunnel(Connection(Role.RELAY, relay_settings), link.ends[0], **(relay_kw or {}))
    agent = Tunnel(
        Connection(Role.AGENT, agent_settings),
        link.ends[1],
        on_stream=on_stream,
        **(agent_kw or {}),
    )
    async with asyncio.timeout(5):
        claim, welcome = await asyncio.gather(
            relay_handshake(relay, public_key_text(key)), agent_handshake(agent, key)
        )
    pair = Pair(link, relay, agent, welcome, claim)
    pair.start(agent=run_agent)
    try:
        yield pair
    finally:
        link.shut(1000, "test over")
        for task in pair.tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(5):
                    await task


async def read_all(stream: TunnelStream) -> bytes:
    body = bytearray()
    async for chunk in stream.iter_body():
        body += chunk
    return bytes(body)


def pattern(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def held_answer(size: int) -> tuple[Handler, asyncio.Event, asyncio.Event]:
    """A handler that sets ``started``, waits for ``release``, then answers 200 with
    ``pattern(size)``: a stream kept in flight for as long as a test needs. Returns the
    handler, ``started`` and ``release``."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(stream: TunnelStream) -> None:
        started.set()
        await release.wait()
        await stream.send_response({"status": 200})
        await stream.write(pattern(size))
        await stream.end()

    return handler, started, release


async def echo_digest(stream: TunnelStream) -> None:
    """Read the request body, answer with its digest and a body of the requested size."""
    assert stream.head is not None
    body = await read_all(stream)
    size = int(stream.head.get("reply", 0))
    await stream.send_response(
        {"status": 200, "sha256": hashlib.sha256(body).hexdigest(), "received": len(body)}
    )
    await stream.write(pattern(size, seed=size))
    await stream.end()


# ---------------------------------------------------------------- handshake


async def test_handshake_over_the_adapter() -> None:
    async with tunnel_pair(echo_digest) as pair:
        assert pair.claim.member_id == MEMBER
        assert pair.claim.gateway_id == GATEWAY
        assert pair.welcome == {"session_id": "ses_test", "member_id": MEMBER}
        assert pair.relay.conn.phase is pair.agent.conn.phase is Phase.OPEN
        assert not pair.relay.closed and not pair.agent.closed


async def test_refused_handshake_closes_with_the_code() -> None:
    link = Link()
    key = ed25519.Ed25519PrivateKey.generate()
    impostor = ed25519.Ed25519PrivateKey.generate()
    relay = Tunnel(Connection(Role.RELAY), link.ends[0])
    agent = Tunnel(Connection(Role.AGENT), link.ends[1])

    async def relay_side() -> None:
        try:
            await relay_handshake(relay, public_key_text(key))
        except handshake.HandshakeRefused as exc:
            await relay.close(exc.code, exc.reason)

    async with asyncio.timeout(5):
        results = await asyncio.gather(
            relay_side(), agent_handshake(agent, impostor), return_exceptions=True
        )
    assert results[0] is None
    assert isinstance(results[1], TransportClosed)
    assert results[1].code == CLOSE_CODE_BASE + ErrorCode.UNAUTHORIZED
    assert results[1].reason == "bad signature"
    assert link.closed == (CLOSE_CODE_BASE + ErrorCode.UNAUTHORIZED, "bad signature")


# ---------------------------------------------------------------- request and response


@pytest.mark.parametrize("pushing", [False, True], ids=["queued", "pushed"])
@pytest.mark.parametrize("settings", [None, SMALL], ids=["default-windows", "small-windows"])
async def test_multi_mib_bodies_both_ways(settings: Settings | None, pushing: bool) -> None:
    upload = pattern(3 * MiB + 123, seed=1)
    async with tunnel_pair(
        echo_digest, relay_settings=settings, agent_settings=settings, pushing=pushing
    ) as pair:
        async with asyncio.timeout(20):
            stream = await pair.relay.open_stream({"reply": 5 * MiB + 7})
            await stream.write(upload)
            await stream.end()
            head = await stream.response()
            body = await read_all(stream)
    assert head == {
        "status": 200,
        "sha256": hashlib.sha256(upload).hexdigest(),
        "received": len(upload),
    }
    assert len(body) == 5 * MiB + 7
    assert body == pattern(5 * MiB + 7, seed=5 * MiB + 7)
    assert pair.relay.inflight == 0
    assert pair.agent.inflight == 0
    assert await stream.read() == b""  # the end stays the end


def _taking_bulk(end: MemoryTransport, seen: list[tuple[int, int]]) -> None:
    """Give ``end`` a ``send_bulk`` that records each bulk message and sends it joined."""

    async def send_bulk(message: f.BulkMessage) -> None:
        seen.append((end.side, len(message.payload)))
        await end.send(message.join())

    setattr(end, "send_bulk", send_bulk)


async def test_bulk_data_reaches_a_transport_that_takes_it_in_two_parts() -> None:
    upload = pattern(3 * MiB + 5, seed=3)
    seen: list[tuple[int, int]] = []
    async with tunnel_pair(echo_digest) as pair:
        for end in pair.link.ends:
            _taking_bulk(end, seen)
        async with asyncio.timeout(20):
            stream = await pair.relay.open_stream({"reply": 2 * MiB + 1})
            await stream.write(upload)
            await stream.end()
            head = await stream.response()
            body = await read_all(stream)
    assert head["sha256"] == hashlib.sha256(upload).hexdigest()
    assert body == pattern(2 * MiB + 1, seed=2 * MiB + 1)
    assert {side for side, _ in seen} == {0, 1}  # the upload's and the download's
    assert all(size >= f.BULK_FROM for _, size in seen)


async def test_request_without_body() -> None:
    seen: list[bool] = []

    async def handler(stream: TunnelStream) -> None:
        seen.append(stream.has_body)
        assert await stream.read() == b""
        await stream.send_response({"status": 204}, end_stream=True)

    async with tunnel_pair(handler) as pair:
        async with asyncio.timeout(5):
            stream = await pair.relay.open_stream({"method": "GET"}, end_stream=True)
            assert await stream.response() == {"status": 204}
            assert await stream.read() == b""
    assert seen == [False]


async def test_response_wait_is_bounded_and_a_late_head_is_dropped() -> None:
    answer = asyncio.Event()

    async def handler(stream: TunnelStream) -> None:
        await answer.wait()
        with contextlib.suppress(StreamError):
            await stream.send_response({"status": 200}, end_stream=True)

    async with tunnel_pair(handler) as pair:
        async with asyncio.timeout(5):
            slow = await pair.relay.open_stream({"method": "GET"}, end_stream=True)
            started = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await slow.response(within=0.05)
            assert asyncio.get_running_loop().time() - started < 1
            answer.set()  # the head arrives after the wait gave up: nothing breaks
            fast = await pair.relay.open_stream({"method": "GET"}, end_stream=True)
            assert await fast.response(within=5) == {"status": 200}
            await slow.reset(ErrorCode.DEADLINE_EXCEEDED, "deadline passed")


@contextlib.asynccontextmanager
async def _relay_with_held_answers() -> AsyncIterator[tuple[Tunnel, asyncio.Event]]:
    """The relay's end of a tunnel whose agent answers 200 at once, or, for a head with
    ``hold``, once the event is set; five seconds for the whole test."""
    release = asyncio.Event()

    async def handler(stream: TunnelStream) -> None:
        if (stream.head or {}).get("hold"):
            await release.wait()
        with contextlib.suppress(StreamError):
            await stream.send_response({"status": 200}, end_stream=True)

    async with tunnel_pair(handler) as pair, asyncio.timeout(5):
        yield pair.relay, release


async def _get(tunnel: Tunnel, hold: bool = False) -> TunnelStream:
    head: dict[str, Any] = {"method": "GET", "hold": True} if hold else {"method": "GET"}
    return await tunnel.open_stream(head, end_stream=True)


async def test_head_waits_share_one_timer_and_each_keeps_its_own_deadline() -> None:
    """Every stream waiting for its head is watched by the tunnel's one timer: answered
    waits leave nothing behind, the timer is not remade per request, and a shorter wait
    among longer ones still ends on time."""
    async with _relay_with_held_answers() as (tunnel, release):
        assert await (await _get(tunnel)).response(within=30) == {"status": 200}
        timer = tunnel._head_timer
        assert timer is not None and timer.armed and not tunnel._head_waits
        first_at = timer.at
        for _ in range(5):
            assert await (await _get(tunnel)).response(within=30) == {"status": 200}
        assert tunnel._head_timer is timer and timer.armed and timer.at == first_at
        assert not tunnel._head_waits

        held = [await _get(tunnel, hold=True) for _ in range(2)]
        long_wait = asyncio.ensure_future(held[0].response(within=3))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await held[1].response(within=0.1)
        assert 0.09 < loop.time() - started < 1
        assert not long_wait.done()  # its own deadline is still ahead
        release.set()
        assert await long_wait == {"status": 200}
        assert not tunnel._head_waits
        await held[1].reset(ErrorCode.DEADLINE_EXCEEDED, "deadline passed")


async def test_a_head_timer_armed_for_an_answered_wait_moves_to_the_next_deadline() -> None:
    """The timer fires at the deadline of a wait that was answered long ago: a wait still in
    progress, with a later deadline, goes on until its own."""
    async with _relay_with_held_answers() as (tunnel, release):
        assert await (await _get(tunnel)).response(within=0.2) == {"status": 200}
        waiting = asyncio.ensure_future((await _get(tunnel, hold=True)).response(within=3))
        await asyncio.sleep(0.5)  # past the first wait's deadline
        assert not waiting.done()
        release.set()
        assert await waiting == {"status": 200}


@pytest.mark.parametrize("pushing", [False, True], ids=["queued", "pushed"])
async def test_many_concurrent_streams(pushing: bool) -> None:
    async with tunnel_pair(
        echo_digest, relay_settings=SMALL, agent_settings=SMALL, pushing=pushing
    ) as pair:

        async def one(n: int) -> tuple[dict[str, Any], bytes]:
            stream = await pair.relay.open_stream({"reply": 10_000 * n})
            await stream.write(pattern(5_000 * n, seed=n))
            await stream.end()
            return await stream.response(), await read_all(stream)

        async with asyncio.timeout(20):
            results = await asyncio.gather(*(one(n) for n in range(1, 31)))
    for n, (head, body) in enumerate(results, start=1):
        assert head["received"] == 5_000 * n
        assert head["sha256"] == hashlib.sha256(pattern(5_000 * n, seed=n)).hexdigest()
        assert body == pattern(10_000 * n, seed=10_000 * n)


async def test_slow_reader_does_not_block_another_stream() -> None:
    big_done = asyncio.Event()

    async def handler(stream: TunnelStream) -> None:
        assert stream.head is not None
        if stream.head["op"] == "big":
            await stream.send_response({"status": 200})
            await stream.write(pattern(2 * MiB))
            await stream.end()
            big_done.set()
        else:
            await stream.send_response({"status": 200})
            await stream.write(b"small answer")
            await stream.end()

    async with tunnel_pair(handler, relay_settings=SMALL, agent_settings=SMALL) as pair:
        async with asyncio.timeout(10):
            big = await pair.relay.open_stream({"op": "big"}, end_stream=True)
            await big.response()  # ... and then nobody reads its body for a while
            await asyncio.sleep(0.05)
            small = await pair.relay.open_stream({"op": "small"}, end_stream=True)
            assert await small.response() == {"status": 200}
            assert await read_all(small) == b"small answer"
            # The big writer is held back by the stream window, not buffered without bound.
            assert not big_done.is_set()
            buffered = sum(len(c) for c in big._chunks._queue if isinstance(c, bytes | memoryview))  # type: ignore[attr-defined]
            assert 0 < buffered <= SMALL.stream_window
            assert await read_all(big) == pattern(2 * MiB)
            await asyncio.wait_for(big_done.wait(), 5)


async def test_slow_reader_on_the_agent_side() -> None:
    """An upload the agent does not read stalls only its own stream."""
    release = asyncio.Event()

    async def handler(stream: TunnelStream) -> None:
        assert stream.head is not None
        if stream.head["op"] == "upload":
            await release.wait()
            await stream.send_response({"got": len(await read_all(stream))}, end_stream=True)
        else:
            await stream.send_response({"pong": True}, end_stream=True)

    async with tunnel_pair(handler, relay_settings=SMALL, agent_settings=SMALL) as pair:
        async with asyncio.timeout(10):
            upload = await pair.relay.open_stream({"op": "upload"})
            writer = asyncio.create_task(upload.write(pattern(MiB)))
            await asyncio.sleep(0.1)
            assert not writer.done()  # blocked on the agent's stream window
            ping = await pair.relay.open_stream({"op": "ping"}, end_stream=True)
            assert await ping.response() == {"pong": True}
            release.set()
            await writer
            await upload.end()
            assert await upload.response() == {"got": MiB}


# ---------------------------------------------------------------- resets


async def test_agent_reset_mid_body_reaches_the_relay() -> None:
    async def handler(stream: TunnelStream) -> None:
        await stream.send_response({"status": 200})
        await stream.write(pattern(100_000))
        await stream.reset(ErrorCode.UPSTREAM_ERROR, "upstream died")

    async with tunnel_pair(handler, relay_settings=SMALL, agent_settings=SMALL) as pair:
        async with asyncio.timeout(5):
            stream = await pair.relay.open_stream({}, end_stream=True)
            assert await stream.response() == {"status": 200}
            received = bytearray()
            with pytest.raises(StreamError) as info:
                while chunk := await stream.read():
                    received += chunk
            assert info.value.code is ErrorCode.UPSTREAM_ERROR
            assert info.value.reason == "upstream died"
            assert bytes(received) == pattern(100_000)[: len(received)]
            with pytest.raises(StreamError):
                await stream.read()  # the error sticks
            with pytest.raises(StreamError):
                await stream.write(b"x")
            assert pair.relay.inflight == 0
            # The tunnel itself carries on.
            other = await pair.relay.open_stream({}, end_stream=True)
            assert await other.response() == {"status": 200}


async def test_relay_reset_mid_upload_reaches_the_agent() -> None:
    outcome: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

    async def handler(stream: TunnelStream) -> None:
        try:
            outcome.set_result(await read_all(stream))
        except StreamError as exc:
            outcome.set_result(exc)

    async with tunnel_pair(handler, relay_settings=SMALL, agent_settings=SMALL) as pair:
        async with asyncio.timeout(5):
            stream = await pair.relay.open_stream({})
            await stream.write(pattern(50_000))
            await stream.reset(ErrorCode.CANCEL, "caller went away")
            result = await outcome
            with pytest.raises(StreamError) as info:
                await stream.response()
    assert isinstance(result, StreamError)
    assert (result.code, result.reason) == (ErrorCode.CANCEL, "caller went away")
    assert info.value.code is ErrorCode.CANCEL


async def test_reset_without_reading_returns_the_tunnel_credit() -> None:
    """Abandoned downloads must not eat the tunnel window: each one here buffers a whole
    stream window at the relay, and the tunnel window holds only two of those."""
    settings = Settings(stream_window=64 * 1024, tunnel_window=128 * 1024, max_data=16 * 1024)
    written: asyncio.Queue[int] = asyncio.Queue()

    async def handler(stream: TunnelStream) -> None:
        await stream.send_response({"status": 200})
        await stream.write(pattern(64 * 1024))
        await written.put(stream.id)

    async with tunnel_pair(handler, relay_settings=settings, agent_settings=settings) as pair:
        for _ in range(6):
            async with asyncio.timeout(3):
                stream = await pair.relay.open_stream({}, end_stream=True)
                await stream.response()
                assert len(await stream.read()) == 16 * 1024  # the caller reads a little
                assert await written.get() == stream.id
                await asyncio.sleep(0.01)  # the rest arrives and is buffered
                await stream.reset(ErrorCode.CANCEL, "caller went away")


# ---------------------------------------------------------------- transport failures


async def test_an_answer_that_arrived_whole_is_read_whole_though_its_credit_cannot_go_back() -> (
    None
):
    """The agent answered in full and its connection went before the relay read the answer
    (a drained agent leaving): the credit each read returns has nowhere to go, and the
    chunks are the caller's all the same. A failed credit write once cut such an answer
    short after its head."""
    # Within both windows, so it all arrives unread; over half the tunnel's, so reading it
    # returns tunnel credit.
    settings = Settings(stream_window=512 * 1024, tunnel_window=256 * 1024, max_data=16 * 1024)
    body = pattern(200 * 1024, seed=7)

    async def handler(stream: TunnelStream) -> None:
        await stream.send_response({"status": 200})
        await stream.write(body, end=True)

    async with tunnel_pair(handler, relay_settings=settings, agent_settings=settings) as pair:
        async with asyncio.timeout(5):
            stream = await pair.relay.open_stream({"op": "get"}, end_stream=True)
            await stream.response()
            while pair.relay.conn.is_active(stream.id):
                await asyncio.sleep(0.001)  # until the whole answer is here, END included
            relay_end = pair.link.ends[0]

            calls: list[int] = []

            async def gone(data: bytes) -> None:
                calls.append(len(data))
                raise TransportClosed("agent disconnected")

            setattr(relay_end, "send", gone)  # the connection went; the tunnel has not seen it
            assert await read_all(stream) == body
            assert calls  # a credit write was tried, and failed


async def test_transport_closed_mid_stream_fails_every_stream() -> None:
    started = asyncio.Event()
    handler_errors: list[BaseException] = []

    async def handler(stream: TunnelStream) -> None:
        assert stream.head is not None
        try:
            if stream.head["op"] == "download":
                await stream.send_response({"status": 200})
                await stream.write(pattern(10_000))
                started.set()
                await asyncio.Event().wait()
            else:
                await asyncio.Event().wait()  # never reads the upload
        except (StreamError, asyncio.CancelledError) as exc:
            handler_errors.append(exc)
            raise

    async with tunnel_pair(handler, relay_settings=SMALL, agent_settings=SMALL) as pair:
        async with asyncio.timeout(5):
            download = await pair.relay.open_stream({"op": "download"}, end_stream=True)
            upload = await pair.relay.open_stream({"op": "upload"})
            writer = asyncio.create_task(upload.write(pattern(MiB)))
            await started.wait()
            await download.response()
            assert len(await download.read()) > 0
            await asyncio.sleep(0.05)
            assert not writer.done()

            pair.link.shut(1006, "connection lost")

            with pytest.raises(StreamError) as info:
                while await download.read():
                    pass
            assert info.value.code is ErrorCode.CANCEL
            with pytest.raises(StreamError):
                await writer
            with pytest.raises(StreamError):
                await upload.response()
            await pair.relay.wait_closed()
            await pair.agent.wait_closed()
    assert pair.relay.closed and pair.agent.closed
    assert pair.relay.inflight == pair.agent.inflight == 0
    assert len(handler_errors) == 2
    with pytest.raises(StreamUnavailable):
        await pair.relay.open_stream({})


@pytest.mark.parametrize("pushing", [False, True], ids=["queued", "pushed"])
async def test_protocol_error_from_the_peer_closes_the_tunnel(pushing: bool) -> None:
    async with tunnel_pair(echo_digest, pushing=pushing) as pair:
        stream = await pair.relay.open_stream({"reply": 0})
        # DATA on a stream that was never opened: a tunnel-level violation.
        await pair.link.ends[0].send(f.encode(f.FrameType.DATA, 99, b"x"))
        async with asyncio.timeout(5):
            await pair.agent.wait_closed()
            await pair.relay.wait_closed()
            with pytest.raises(StreamError):
                await stream.response()
    assert pair.link.ends[1].close_calls == [
        (CLOSE_CODE_BASE + ErrorCode.PROTOCOL_ERROR, "frame for idle stream 99")
    ]
    assert pair.agent.close_reason == "frame for idle stream 99"


async def test_pushed_messages_are_handled_and_the_ones_queued_first_keep_their_place() -> None:
    """Messages that reached the agent's queue before it ran are handled first, through
    recv; once the queue is empty the transport pushes, and the body arrives in order."""
    async with tunnel_pair(echo_digest, pushing=True, run_agent=False) as pair:
        upload = [pattern(1000, seed=n) for n in range(6)]
        stream = await pair.relay.open_stream({"reply": 10})
        for piece in upload[:3]:
            await stream.write(piece)  # queued: the agent's tunnel has not asked to push
        agent_end = pair.link.ends[1]
        assert isinstance(agent_end, PushingTransport)
        assert agent_end.inbox.qsize() == 4 and agent_end.pushed == 0
        pair.start(relay=False)
        async with asyncio.timeout(5):
            while agent_end.feed is None:
                await asyncio.sleep(0)
            for piece in upload[3:]:
                await stream.write(piece)
            await stream.end()
            head = await stream.response()
            assert await read_all(stream) == pattern(10, seed=10)
    assert head["sha256"] == hashlib.sha256(b"".join(upload)).hexdigest()
    assert agent_end.pushed == 4  # three DATA and the end


async def test_while_a_write_waits_messages_are_queued_and_taken_one_flush_at_a_time() -> None:
    """A tunnel refuses pushes while a write holds its lock (the peer is not reading): what
    arrives meanwhile waits in the transport's queue, where reading stops once it is full,
    and run() takes it after the write, as without pushing."""
    async with tunnel_pair(echo_digest, pushing=True) as pair:
        relay_end = pair.link.ends[0]
        assert isinstance(relay_end, PushingTransport)
        async with asyncio.timeout(5):
            while relay_end.feed is None:
                await asyncio.sleep(0)
            async with pair.relay._write_lock:  # a write that cannot finish yet
                before = relay_end.pushed
                for _ in range(3):
                    pair.agent.conn.ping(1)
                    await pair.agent.flush()
                await asyncio.sleep(0.05)
                assert relay_end.pushed == before
                # run() took the first and waits behind the write with it; reading would
                # stop here once the transport's queue was full.
                assert relay_end.inbox.qsize() == 2
            while relay_end.inbox.qsize():
                await asyncio.sleep(0)
            stream = await pair.relay.open_stream({"reply": 5}, end_stream=True)
            assert await read_all(stream) == pattern(5, seed=5)
        assert relay_end.pushed > before


@pytest.mark.parametrize("pushing", [False, True], ids=["queued", "pushed"])
async def test_a_failure_handling_a_message_ends_the_tunnel_and_run_raises_it(
    pushing: bool,
) -> None:
    def broken(payload: dict[str, Any]) -> None:
        raise RuntimeError("a bug in a notice handler")

    async with tunnel_pair(echo_digest, pushing=pushing, relay_kw={"on_notice": broken}) as pair:
        stream = await pair.relay.open_stream({"reply": 0})
        await pair.agent.send_notice({"kind": "load"})
        async with asyncio.timeout(5):
            with pytest.raises(RuntimeError, match="a bug in a notice handler"):
                await pair.tasks[0]  # the relay's run()
            with pytest.raises(StreamError):
                await stream.response()
            await pair.agent.wait_closed()
    assert pair.link.ends[0].close_calls == [
        (CLOSE_CODE_BASE + ErrorCode.PROTOCOL_ERROR, "handling a message failed: RuntimeError")
    ]


async def test_unknown_frames_are_skipped() -> None:
    async with tunnel_pair(echo_digest) as pair:
        await pair.link.ends[0].send(f.HEADER.pack(0x7E, 0, 0) + b"from the future")
        async with asyncio.timeout(5):
            stream = await pair.relay.open_stream({"reply": 3}, end_stream=True)
            assert (await stream.response())["received"] == 0
            assert await read_all(stream) == pattern(3, seed=3)
        assert not pair.agent.closed


# ---------------------------------------------------------------- keepalive


async def test_keepalive_detects_a_silent_peer() -> None:
    relay_kw = {"ping_interval": 0.05, "ping_timeout": 0.25}
    async with tunnel_pair(echo_digest, relay_kw=relay_kw, run_agent=False) as pair:
        stream = await pair.relay.open_stream({"reply": 1})
        async with asyncio.timeout(5):
            await pair.relay.wait_closed()
            with pytest.raises(StreamError) as info:
                await stream.response()
    assert pair.relay.close_reason == "no traffic from peer within ping timeout"
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert pair.link.closed == (
        CLOSE_CODE_BASE + ErrorCode.PROTOCOL_ERROR,
        "no traffic from peer within ping timeout",
    )


async def test_keepalive_keeps_a_live_tunnel_and_measures_rtt() -> None:
    kw = {"ping_interval": 0.05, "ping_timeout": 1.0}
    async with tunnel_pair(echo_digest, relay_kw=kw, agent_kw=kw) as pair:
        await asyncio.sleep(0.6)
        assert not pair.relay.closed and not pair.agent.closed
        assert pair.relay.rtt_ms is not None and 0 <= pair.relay.rtt_ms < 1000
        assert pair.agent.rtt_ms is not None


# ---------------------------------------------------------------- GOAWAY and drain


async def test_goaway_and_drain_let_an_inflight_stream_finish() -> None:
    handler, started, release = held_answer(300_000)
    goaway_seen = asyncio.Event()
    async with tunnel_pair(
        handler,
        relay_settings=SMALL,
        agent_settings=SMALL,
        relay_kw={"on_goaway": goaway_seen.set},
    ) as pair:
        async with asyncio.timeout(10):
            inflight = await pair.relay.open_stream({}, end_stream=True)
            await started.wait()
            await pair.agent.goaway("maintenance")
            await goaway_seen.wait()
            assert not pair.relay.conn.accepting_streams
            with pytest.raises(StreamUnavailable):
                await pair.relay.open_stream({})

            drain = asyncio.create_task(pair.agent.drain(5))
            await asyncio.sleep(0.05)
            assert not drain.done()
            assert pair.agent.inflight == 1
            release.set()
            assert await inflight.response() == {"status": 200}
            assert await read_all(inflight) == pattern(300_000)
            assert await drain is True
            assert pair.agent.inflight == 0
            await pair.agent.close(ErrorCode.NO_ERROR, "agent shut down")
            await pair.relay.wait_closed()
    assert pair.link.closed == (1000, "agent shut down")


async def test_stream_crossing_the_goaway_is_refused() -> None:
    async def handler(stream: TunnelStream) -> None:
        await stream.send_response({"status": 200}, end_stream=True)

    async with tunnel_pair(handler, run_agent=False) as pair:
        # The agent announces GOAWAY before it has seen the relay's next OPEN.
        await pair.agent.goaway("draining")
        crossing = await pair.relay.open_stream({}, end_stream=True)
        pair.start(relay=False)
        async with asyncio.timeout(5):
            with pytest.raises(StreamError) as info:
                await crossing.response()
    assert info.value.code is ErrorCode.REFUSED_STREAM


async def test_drain_gives_up_after_the_grace_period() -> None:
    async def handler(stream: TunnelStream) -> None:
        await asyncio.Event().wait()

    async with tunnel_pair(handler) as pair:
        await pair.relay.open_stream({}, end_stream=True)
        async with asyncio.timeout(5):
            while pair.agent.inflight == 0:
                await asyncio.sleep(0.01)
            await pair.agent.goaway()
            assert await pair.agent.drain(0.1) is False
        assert pair.agent.inflight == 1


# ---------------------------------------------------------------- over a real WebSocket


class WebSocketTransport:
    """A ``websockets`` connection (either end) as a MessageTransport."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def recv(self) -> bytes:
        try:
            message = await self.ws.recv()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            raise TransportClosed(exc.rcvd.reason if exc.rcvd else "lost", code) from exc
        if isinstance(message, str):
            raise TransportClosed("text message")
        data: bytes = message
        return data

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send(data)
        except ConnectionClosed as exc:
            raise TransportClosed("closed", exc.rcvd.code if exc.rcvd else None) from exc

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)


@contextlib.asynccontextmanager
async def websocket_relay(
    public_key: str, settings: Settings
) -> AsyncIterator[tuple[str, asyncio.Queue[Tunnel | handshake.HandshakeRefused]]]:
    tunnels: asyncio.Queue[Tunnel | handshake.HandshakeRefused] = asyncio.Queue()

    async def handler(ws: Any) -> None:
        tunnel = Tunnel(Connection(Role.RELAY, settings), WebSocketTransport(ws))
        try:
            await relay_handshake(tunnel, public_key)
        except handshake.HandshakeRefused as exc:
            await tunnels.put(exc)
            await tunnel.close(exc.code, exc.reason)
            return
        await tunnels.put(tunnel)
        await tunnel.run()

    async with serve(
        handler,
        "127.0.0.1",
        0,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        compression=None,
        max_size=settings.max_message,
        ping_interval=None,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/tunnel", tunnels


async def test_over_a_real_websocket() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    settings = Settings()
    upload = os.urandom(3 * MiB)
    async with (
        asyncio.timeout(30),
        websocket_relay(public_key_text(key), settings) as (url, tunnels),
        connect(
            url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,
            max_size=settings.max_message,
            ping_interval=None,
        ) as ws,
    ):
        assert ws.subprotocol == SUBPROTOCOL
        agent = Tunnel(
            Connection(Role.AGENT, settings), WebSocketTransport(ws), on_stream=echo_digest
        )
        welcome = await agent_handshake(agent, key)
        assert welcome["member_id"] == MEMBER
        agent_run = asyncio.create_task(agent.run())
        relay = await tunnels.get()
        assert isinstance(relay, Tunnel)

        stream = await relay.open_stream({"reply": 5 * MiB})
        await stream.write(upload)
        await stream.end()
        head = await stream.response()
        body = await read_all(stream)
        assert head["sha256"] == hashlib.sha256(upload).hexdigest()
        assert body == pattern(5 * MiB, seed=5 * MiB)

        await agent.close(ErrorCode.NO_ERROR, "done")
        await agent_run
        await relay.wait_closed()
    assert relay.closed


async def test_real_websocket_refuses_a_wrong_key() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    impostor = ed25519.Ed25519PrivateKey.generate()
    async with (
        asyncio.timeout(10),
        websocket_relay(public_key_text(key), Settings()) as (url, tunnels),
        connect(url, subprotocols=[SUBPROTOCOL], compression=None) as ws,  # type: ignore[list-item]
    ):
        agent = Tunnel(Connection(Role.AGENT), WebSocketTransport(ws))
        with pytest.raises(TransportClosed) as info:
            await agent_handshake(agent, impostor)
        refused = await tunnels.get()
    assert isinstance(refused, handshake.HandshakeRefused)
    assert refused.code is ErrorCode.UNAUTHORIZED
    assert info.value.code == CLOSE_CODE_BASE + ErrorCode.UNAUTHORIZED


async def test_a_closed_tunnel_is_freed_without_the_cyclic_collector() -> None:
    """A tunnel that has served requests, once closed, goes with its last reference: its head
    timer lets go of the tunnel's bound method, so nothing it holds (the connection's
    state, its streams, the transport) waits for a full collection."""
    with collector_off():
        async with _relay_with_held_answers() as (tunnel, _release):
            for _ in range(3):
                assert await (await _get(tunnel)).response(within=30) == {"status": 200}
            assert tunnel._head_timer is not None
        del tunnel
        await wait_until_freed(Tunnel, TunnelStream)


async def test_a_lone_streams_answer_is_handled_within_the_push_and_others_queue() -> None:
    """With one stream in flight the relay handles a pushed message inside the transport's
    callback (no loop iteration in between); with more, and behind a message already queued,
    it takes its turn in the loop's queue, in order."""
    waiting: dict[int, TunnelStream] = {}
    handled_at_once: dict[int, bool] = {}
    proceed = asyncio.Event()

    async def handler(stream: TunnelStream) -> None:
        assert stream.head is not None
        number = int(stream.head["n"])
        if stream.head.get("wait"):
            await proceed.wait()
        await stream.send_response({"status": 200, "n": number}, end_stream=True)
        # The push reached the relay's feed before send_response returned.
        handled_at_once[number] = waiting[number]._response.done()

    async with tunnel_pair(handler, pushing=True) as pair, asyncio.timeout(5):
        relay_end = pair.link.ends[0]
        assert isinstance(relay_end, PushingTransport)
        while relay_end.feed is None:  # the handshake's messages are taken first
            await asyncio.sleep(0)
        # A first request, and a moment for the keepalives' first PING and PONG: a push that
        # arrives while the relay writes is refused (see feed) and taken from the queue.
        waiting[0] = await pair.relay.open_stream({"n": 0}, end_stream=True)
        assert (await waiting[0].response())["n"] == 0
        await asyncio.sleep(0.05)
        waiting[1] = await pair.relay.open_stream({"n": 1}, end_stream=True)
        assert (await waiting[1].response())["n"] == 1
        assert handled_at_once[1] is True

        waiting[2] = await pair.relay.open_stream({"n": 2, "wait": True}, end_stream=True)
        waiting[3] = await pair.relay.open_stream({"n": 3, "wait": True}, end_stream=True)
        proceed.set()
        heads = await asyncio.gather(waiting[2].response(), waiting[3].response())
        assert [head["n"] for head in heads] == [2, 3]
        # The first answer found two streams in flight and was queued; the second, alone.
        assert sorted([handled_at_once[2], handled_at_once[3]]) == [False, True]
        assert pair.relay._queued == 0


async def test_two_answers_finished_together_leave_in_one_message() -> None:
    """The first of two streams answered in the same loop iteration is no longer in flight
    once it has sent its end, but the second still is: the first flush waits for it, and both
    answers cross the tunnel as one BATCH."""
    proceed = asyncio.Event()

    async def handler(stream: TunnelStream) -> None:
        await proceed.wait()
        await stream.send_response({"status": 200}, end_stream=True)

    async with tunnel_pair(handler, pushing=True) as pair, asyncio.timeout(5):
        relay_end = pair.link.ends[0]
        assert isinstance(relay_end, PushingTransport)
        await asyncio.sleep(0.05)  # the keepalives' first PING and PONG
        streams = [await pair.relay.open_stream({}, end_stream=True) for _ in range(2)]
        await asyncio.sleep(0.05)  # both handlers wait
        before = relay_end.pushed + relay_end.inbox.qsize()
        proceed.set()
        await asyncio.gather(*(stream.response() for stream in streams))
        assert relay_end.pushed + relay_end.inbox.qsize() - before == 1


async def test_answers_finished_together_leave_in_batches_of_batch_leaves_at() -> None:
    """Frames queued in one loop iteration leave together, but a flush that finds
    BATCH_LEAVES_AT of them queued writes at once: the peer starts on those while the rest
    are queued. Of forty answers finished together the first 16 leave at once; the other 24
    are queued while that write is under way (this test's transport yields in ``send``) and
    leave in the next: two messages, where waiting out the iteration made one."""
    proceed = asyncio.Event()

    async def handler(stream: TunnelStream) -> None:
        await proceed.wait()
        await stream.send_response({"status": 200}, end_stream=True)

    count = 2 * BATCH_LEAVES_AT + 8
    async with tunnel_pair(handler, pushing=True) as pair, asyncio.timeout(5):
        relay_end = pair.link.ends[0]
        assert isinstance(relay_end, PushingTransport)
        await asyncio.sleep(0.05)  # the keepalives' first PING and PONG
        streams = [await pair.relay.open_stream({}, end_stream=True) for _ in range(count)]
        await asyncio.sleep(0.05)  # every handler waits
        before = relay_end.pushed + relay_end.inbox.qsize()
        proceed.set()
        await asyncio.gather(*(stream.response() for stream in streams))
        assert relay_end.pushed + relay_end.inbox.qsize() - before == 2
