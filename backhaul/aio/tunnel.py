"""The asyncio adapter around :class:`backhaul.wire.Connection`, shared by relay and agent.

One reader task turns WebSocket messages into events and routes them to :class:`TunnelStream`
objects; writers queue frames on the sans-I/O connection and :meth:`Tunnel.flush` writes them
out in order under one lock (FIFO, so a large transfer cannot starve a small request: each
DATA frame is at most ``max_data`` bytes and waits its turn like everything else). A keepalive
task pings at an interval and declares the tunnel dead when nothing arrives within the timeout.

The keepalive's watchdog never waits for the write lock: on a half-open connection (the peer's
packets silently dropped) a writer blocked on a full socket buffer holds that lock for good,
and a watchdog behind it would never notice that the peer went silent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Protocol

import structlog

from backhaul.aio.deadlines import SharedTimer
from backhaul.aio.writelock import WriteLock
from backhaul.wire import (
    CLOSE_CODE_BASE,
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    GoAwayReceived,
    NoticeReceived,
    PongReceived,
    ResponseReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamUnavailable,
    UnknownFrameReceived,
    WindowUpdated,
)
from backhaul.wire.frames import BulkMessage

#: Called each time a stream's writer has to wait for flow-control credit (metrics count it).
STALL_HOOKS: list[Callable[[], None]] = []


class TransportClosed(Exception):
    """The WebSocket underneath is gone; ``code`` is the close code when one was received."""

    def __init__(self, reason: str = "", code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class MessageTransport(Protocol):
    """One WebSocket connection, binary messages only.

    A transport may also offer ``push_to(feed) -> bool``: from then on, hand each binary
    message that nothing queued is ahead of to ``feed`` as it arrives, and queue it for
    ``recv`` (which still reports the close) only when ``feed`` returns False; say whether it
    started doing so (not while messages wait in its queue). :meth:`Tunnel.run` asks until
    it does.

    It may also offer ``send_bulk(message)``, which writes a
    :class:`backhaul.wire.frames.BulkMessage` (a bulk DATA message as its frame header and
    its payload) without joining the two; a transport without it is sent the joined bytes.
    """

    async def recv(self) -> bytes: ...

    async def send(self, data: bytes) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class StreamError(Exception):
    """The stream was reset; ``code`` says why."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}" if reason else code.name)
        self.code = code
        self.reason = reason


_END = object()


class _OneIteration:
    """``await`` it to let the loop run everything else ready once, as ``asyncio.sleep(0)``
    does, without that function's two interpreted frames (this module is compiled): a bare
    ``yield`` to the task running the coroutine, which reschedules it at once."""

    def __await__(self) -> Generator[None, None, None]:
        yield


_ONE_ITERATION = _OneIteration()

#: A flush that finds this many frames queued writes them at once instead of waiting out the
#: loop iteration for more. Waiting made the OPENs of every request that arrived together
#: (or the answers of every stream that finished together) one write: at 64 clients the
#: requests then moved through the relay, the agent and the API as one convoy, one process
#: at a time, and the machine's cores stood idle 17 % of the time. In batches of 16 the next
#: process starts on the first ones while this one queues the rest (idle 10 %). At 4 the
#: extra writes cost more than they gained, 8 fell between, and 32 did no better than 16
#: (bench/PROFILE.md, "Convoys").
BATCH_LEAVES_AT = 16


class _Inbox:
    """A stream's received items (body chunks, then the end or an error), read by one task.

    What ``asyncio.Queue`` does for a single reader without its bookkeeping: a queue and its
    getter and putter lists were the most expensive part of opening a stream.
    """

    __slots__ = ("_queue", "_waiter")

    def __init__(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._queue.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> Any:
        while not self._queue:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._queue.popleft()

    def get_nowait(self) -> Any:
        return self._queue.popleft()

    def empty(self) -> bool:
        return not self._queue


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class TunnelStream:
    """One request/response exchange on the tunnel."""

    def __init__(self, tunnel: Tunnel, stream_id: int, head: dict[str, Any] | None = None) -> None:
        self.tunnel = tunnel
        self.id = stream_id
        self.head = head
        self._chunks = _Inbox()
        self._response: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        #: Set when flow-control credit (or an error) arrives; made once the stream first
        #: waits for credit, which most streams never do.
        self._writable: asyncio.Event | None = None
        self._error: StreamError | None = None
        #: False when the peer's OPEN carried END_STREAM: there is no request body at all.
        self.has_body = True
        self.closed = False

    # -- receiving

    async def response(self, within: float | None = None) -> dict[str, Any]:
        """Relay side: the agent's RESPONSE head; TimeoutError once ``within`` seconds pass.

        The wait is bounded by the tunnel's one timer for every stream waiting for its head
        (:meth:`Tunnel._watch_head`), not by ``asyncio.timeout`` or a timer of its own,
        whose making and cancelling cost more than the rest of this wait on every request.
        """
        waiter = self._response
        if within is None or waiter.done():
            return await waiter
        tunnel = self.tunnel
        tunnel._watch_head(self, waiter.get_loop(), within)
        try:
            return await waiter
        finally:
            tunnel._head_waits.pop(self, None)

    async def read(self) -> bytes | memoryview:
        """Next body chunk; b"" at the end. Raises StreamError if the stream was reset.

        A bulk chunk is a read-only view of the tunnel message it came in (no copy)."""
        item = await self._chunks.get()
        if item is _END:
            self._chunks.put_nowait(_END)
            return b""
        if isinstance(item, StreamError):
            self._chunks.put_nowait(item)
            raise item
        data: bytes | memoryview = item
        # The chunk is handed to the application: its credit goes back to the peer. A tunnel
        # that closed once the chunk was here (the agent drained and left) has no use for
        # the credit, and the chunk is the application's all the same: losing it cut short
        # an answer that had arrived whole.
        self.tunnel.conn.acknowledge(self.id, len(data))
        try:
            await self.tunnel.flush(self)
        except TransportClosed:
            pass
        return data

    @property
    def at_end(self) -> bool:
        """True when the body's end is all that is left to read: the next read returns b""."""
        queue = self._chunks._queue
        return len(queue) == 1 and queue[0] is _END

    def iter_body(self) -> _Body:
        """The request or response body, chunk by chunk; nothing when the stream has none."""
        return _Body(self)

    # -- sending

    async def send_response(
        self, head: dict[str, Any], end_stream: bool = False, *, flush: bool = True
    ) -> None:
        """Queue the RESPONSE; with ``flush=False`` it leaves with the next write."""
        self._check()
        self.tunnel.conn.send_response(self.id, head, end_stream)
        self.tunnel._forget_if_done(self)
        if flush:
            await self.tunnel.flush(self)

    async def write(self, data: bytes | memoryview, end: bool = False) -> None:
        """Send body bytes, waiting for flow-control credit as needed. With ``end``, the last
        DATA frame carries END_STREAM, saving the separate END message."""
        view = memoryview(data)
        conn = self.tunnel.conn
        while view:
            self._check()
            allowed = conn.max_sendable(self.id)
            if allowed <= 0:
                for hook in STALL_HOOKS:
                    hook()
                writable = self._writable
                if writable is None:
                    writable = self._writable = asyncio.Event()
                writable.clear()
                self.tunnel._blocked.add(self)
                await writable.wait()
                continue
            chunk, view = view[:allowed], view[allowed:]
            last = end and not view
            conn.send_data(self.id, chunk, end_stream=last)
            if last:
                self.tunnel._forget_if_done(self)
            await self.tunnel.flush(self)
        if end and not data:
            await self.end()

    async def end(self) -> None:
        self._check()
        self.tunnel.conn.end_stream(self.id)
        self.tunnel._forget_if_done(self)
        await self.tunnel.flush(self)

    async def reset(self, code: ErrorCode, reason: str = "") -> None:
        """Abandon the stream (no-op when already finished)."""
        self._fail(StreamError(code, reason))
        self.tunnel.conn.reset_stream(self.id, code, reason)
        self.tunnel._streams.pop(self.id, None)
        self._discard_unread()
        with contextlib.suppress(TransportClosed):
            await self.tunnel.flush(self)

    # -- internals, driven by the tunnel's reader

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self.tunnel.closed:
            raise StreamError(ErrorCode.CANCEL, "tunnel closed")

    def _discard_unread(self) -> None:
        """Body chunks buffered here will never be read: give their tunnel credit back."""
        unread = 0
        kept: list[Any] = []
        while not self._chunks.empty():
            item = self._chunks.get_nowait()
            if isinstance(item, bytes | memoryview):
                unread += len(item)
            else:
                kept.append(item)
        for item in kept:
            self._chunks.put_nowait(item)
        if unread:
            self.tunnel.conn.acknowledge(self.id, unread)

    def _fail(self, error: StreamError) -> None:
        if self._error is None:
            self._error = error
            self._chunks.put_nowait(error)
            if not self._response.done():
                self._response.set_exception(error)
                self._response.exception()  # mark retrieved: nobody may be waiting
        self._wake_writer()
        self.closed = True

    def _wake_writer(self) -> None:
        if self._writable is not None:
            self._writable.set()


class Tunnel:
    """A live tunnel: the sans-I/O connection, its transport, and its streams."""

    def __init__(
        self,
        conn: Connection,
        transport: MessageTransport,
        *,
        ping_interval: float = 15.0,
        ping_timeout: float = 30.0,
        on_stream: Callable[[TunnelStream], Awaitable[None]] | None = None,
        on_notice: Callable[[dict[str, Any]], None] | None = None,
        on_goaway: Callable[[], None] | None = None,
        logger: Any = None,
    ) -> None:
        self.conn = conn
        self.transport = transport
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.on_stream = on_stream
        self.on_notice = on_notice
        self.on_goaway = on_goaway
        self.log = logger or structlog.get_logger("backhaul.tunnel")
        self.rtt_ms: float | None = None
        self.closed = False
        #: Streams waiting for their RESPONSE head, and the deadline of each: one timer for
        #: all of them (TunnelStream.response), made on the first wait.
        self._head_waits: dict[TunnelStream, float] = {}
        self._head_timer: SharedTimer | None = None
        self.close_reason = ""
        self.last_received = time.monotonic()
        self._streams: dict[int, TunnelStream] = {}
        self._blocked: set[TunnelStream] = set()
        self._write_lock = WriteLock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._done = asyncio.Event()
        #: Set when a stream finishes while drain() waits, so it can wait without polling.
        self._changed = asyncio.Event()
        #: drain() calls waiting on _changed (an Event's set is Python code: skipped when 0).
        self._draining = 0
        #: A flush task for frames that pushed messages queued is on its way (see feed).
        self._flush_pending = False
        #: Pushed messages waiting in the loop's queue of callbacks to be handled (see feed).
        self._queued = 0
        #: What went wrong handling a pushed message; run() raises it once the tunnel is down.
        self._failure: BaseException | None = None
        self._aborting: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop  # set by run(), before anything is pushed

    # -- handshake helpers (before run())

    async def receive_events(self) -> list[Event]:
        """Read one message and return its events (used during the handshake)."""
        events = self.conn.receive_message(await self.transport.recv())
        self.last_received = time.monotonic()
        await self.flush()
        return events

    async def flush(self, stream: TunnelStream | None = None) -> None:
        """Write out every frame queued so far.

        A flush of small frames yields once before it writes, so the frames other
        tasks queue in the same iteration (the OPENs of concurrent requests, the answers of
        several streams) leave together in one BATCH message: one WebSocket frame, one TLS
        record, one write. When no stream but ``stream`` (the one flushing, if any) is in
        flight, no other task has frames to add, and it writes at once: a lone request's
        frames leave without a loop iteration's wait (a stream's RESPONSE and its DATA are
        queued before their one flush). A stream that has sent its end is no longer in
        flight, so the first of two answers finished together waits for the second.
        Nor does it wait once :data:`BATCH_LEAVES_AT` frames are queued. A flush with
        nothing queued still waits for a write in progress, which may be carrying its frames.
        """
        lock = self._write_lock
        if not self.conn.has_data_to_send:
            if lock.locked():
                await lock.acquire()
                lock.release()
            return
        conn = self.conn
        if conn.batching and conn.queued < BATCH_LEAVES_AT and self._others_in_flight(stream):
            await _ONE_ITERATION
        await lock.acquire()
        try:
            for message in self.conn.messages_to_send():
                if self.closed:
                    raise TransportClosed(self.close_reason)
                try:
                    if isinstance(message, BulkMessage):
                        await self._send_bulk(message)
                    else:
                        await self.transport.send(message)
                except TransportClosed:
                    raise
                except Exception as exc:
                    raise TransportClosed(str(exc)) from exc
        finally:
            lock.release()

    async def _send_bulk(self, message: BulkMessage) -> None:
        send_bulk: Callable[[BulkMessage], Awaitable[None]] | None = getattr(
            self.transport, "send_bulk", None
        )
        if send_bulk is not None:
            await send_bulk(message)
        else:
            await self.transport.send(message.join())

    def _others_in_flight(self, stream: TunnelStream | None) -> bool:
        """Whether a stream other than ``stream`` (the one flushing, if any) is in flight:
        one whose task may queue frames in this loop iteration too."""
        count = len(self._streams)
        if stream is not None and self._streams.get(stream.id) is stream:
            count -= 1
        return count > 0

    # -- running

    @property
    def inflight(self) -> int:
        return len(self._streams)

    async def open_stream(
        self, head: dict[str, Any] | bytes, end_stream: bool = False, fixed: bytes | None = None
    ) -> TunnelStream:
        """Relay side: start a request (``fixed``: see :meth:`Connection.open_stream`).
        Raises StreamUnavailable when the tunnel can't take it."""
        if self.closed:
            raise StreamUnavailable("tunnel closed")
        stream_id = self.conn.open_stream(head, end_stream, fixed)
        stream = TunnelStream(self, stream_id)
        self._streams[stream_id] = stream
        try:
            await self.flush(stream)
        except TransportClosed as exc:
            # The peer vanished before the OPEN left: nothing was processed, try elsewhere.
            self._streams.pop(stream_id, None)
            raise StreamUnavailable(f"tunnel closed: {exc}") from exc
        return stream

    async def run(self) -> None:
        """Serve the tunnel until it closes; every stream still open then fails.

        A transport that can push (``push_to``, see :class:`MessageTransport`) hands each
        message to :meth:`feed` from its own callback as soon as nothing is queued before
        it; what it queues instead (before pushing started, or behind a queued message)
        arrives through ``recv`` here, in order."""
        self._loop = asyncio.get_running_loop()
        keepalive = asyncio.create_task(self._keepalive())
        push_to: Callable[[Callable[[bytes], bool]], bool] | None = getattr(
            self.transport, "push_to", None
        )
        pushing = False
        try:
            while not self.closed:
                if push_to is not None and not pushing:
                    pushing = push_to(self.feed)
                try:
                    message = await self.transport.recv()
                except TransportClosed as exc:
                    self._close_streams(ErrorCode.CANCEL, str(exc) or "tunnel closed")
                    break
                if self._receive(message):
                    await self.flush()
        except TransportClosed as exc:
            self._close_streams(ErrorCode.CANCEL, str(exc) or "tunnel closed")
        finally:
            keepalive.cancel()
            self._close_streams(ErrorCode.CANCEL, self.close_reason or "tunnel closed")
            for task in list(self._tasks):
                task.cancel()
            self._done.set()
        if self._failure is not None:
            raise self._failure

    def feed(self, message: bytes) -> bool:
        """Take one message the transport pushed (see :class:`MessageTransport`): handled
        from the loop's queue of callbacks, without a queue of the transport's, a reader
        task to wake, or the layers above the transport's own callback in between.

        Under load, handling waits for that callback to return (``call_soon``) rather than
        running inside it: measured at 64 concurrent clients, handling inside the relay's
        read callback cost 5 % of its requests per second (the callers' requests waited
        behind it), and the callback queue keeps the messages in order all the same. With at
        most one stream in flight and no message queued, there is nobody to wait behind it,
        and the message is handled at once: a lone request's round trip then takes one loop
        iteration less at each end of the tunnel (bench/PROFILE.md, "One stream in flight").

        Refused (False) while a write waits for the peer to read: the transport queues the
        message, :meth:`run` takes it with a flush after each as before, and reading stops
        once the transport's queue is full. A peer that sends PINGs and never reads the
        PONGs is held back by TCP instead of growing what waits to be sent."""
        if self._write_lock.locked():
            return False
        if self._queued or len(self._streams) > 1:
            self._queued += 1
            self._loop.call_soon(self._handle_queued, message)
        else:
            self._handle_message(message)
        return True

    def _handle_queued(self, message: bytes) -> None:
        self._queued -= 1
        self._handle_message(message)

    def _receive(self, message: bytes) -> bool:
        """Handle one message's events; False if the tunnel is closed or ends here. Never
        raises: a failure ends the tunnel, and :meth:`run` raises it."""
        if self.closed:
            return False
        self.last_received = time.monotonic()
        try:
            for event in self.conn.receive_message(message):
                self._handle(event)
        except Exception as exc:
            self._failure = exc
            reason = f"handling a message failed: {type(exc).__name__}"
            # Not one of self._tasks, which run() cancels when the close it starts arrives.
            self._aborting = self._loop.create_task(self._abort(reason))
            return False
        return True

    def _handle_message(self, message: bytes) -> None:
        """A pushed message's events; frames they make the tunnel send (WINDOW, PONG)
        leave from one flush task."""
        if not self._receive(message):
            return
        if self.conn.has_data_to_send and not self._flush_pending:
            self._flush_pending = True
            self._spawn(self._flush_pushed())

    async def _flush_pushed(self) -> None:
        self._flush_pending = False  # frames queued from here on take a flush of their own
        with contextlib.suppress(TransportClosed):  # run() sees the transport close
            await self.flush()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_closed(self) -> None:
        await self._done.wait()

    async def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        if self.closed:
            return
        self.conn.terminate(code, reason)
        with contextlib.suppress(TransportClosed):
            await self.flush()
        self._close_streams(code, reason or "tunnel closed")
        with contextlib.suppress(Exception):
            await self.transport.close(
                1000 if code is ErrorCode.NO_ERROR else CLOSE_CODE_BASE + code, reason[:120]
            )

    async def goaway(self, reason: str = "draining") -> None:
        self.conn.goaway(ErrorCode.NO_ERROR, reason)
        await self.flush()

    async def send_notice(self, payload: dict[str, Any]) -> None:
        self.conn.send_notice(payload)
        await self.flush()

    async def drain(self, grace: float) -> bool:
        """Wait until no stream is open (or ``grace`` seconds pass); True when drained."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                self._draining += 1
                try:
                    while self._streams and not self.closed:
                        self._changed.clear()
                        await self._changed.wait()
                finally:
                    self._draining -= 1
        return not self._streams

    # -- internals

    def _handle(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None and event.data:
                stream._chunks.put_nowait(event.data)
            elif event.data:
                self.conn.acknowledge(event.stream_id, len(event.data))
        elif isinstance(event, StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._chunks.put_nowait(_END)
                if not self.conn.is_active(event.stream_id):
                    self._streams.pop(event.stream_id, None)
                    self._stream_gone()
        elif isinstance(event, WindowUpdated):
            self._wake(event.stream_id)
        elif isinstance(event, ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None and not stream._response.done():
                stream._response.set_result(event.head)
        elif isinstance(event, StreamOpened):
            stream = TunnelStream(self, event.stream_id, event.head)
            stream.has_body = not event.end_stream
            self._streams[event.stream_id] = stream
            if self.on_stream is not None:
                self._spawn(self._serve(stream))
        elif isinstance(event, StreamReset):
            if not event.remote:  # we reset it: the peer broke a rule on this stream
                self.log.warning(
                    "tunnel.stream_refused",
                    stream_id=event.stream_id,
                    code=event.code.name,
                    reason=event.reason,
                )
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream._fail(StreamError(event.code, event.reason))
                self._blocked.discard(stream)
                self._stream_gone()
        elif isinstance(event, PongReceived):
            self.rtt_ms = max(0.0, (time.monotonic_ns() - event.opaque) / 1e6)
        elif isinstance(event, GoAwayReceived):
            self.log.info("tunnel.goaway_received", code=event.code.name, reason=event.reason)
            if self.on_goaway is not None:
                self.on_goaway()
        elif isinstance(event, NoticeReceived):
            if self.on_notice is not None:
                self.on_notice(event.payload)
        elif isinstance(event, UnknownFrameReceived):
            self.log.warning("tunnel.unknown_frame", frame_type=event.frame_type)
        elif isinstance(event, ConnectionTerminated):
            self.log.warning("tunnel.protocol_error", code=event.code.name, reason=event.reason)
            self.close_reason = event.reason
            self._spawn(self.close(event.code, event.reason))

    async def _serve(self, stream: TunnelStream) -> None:
        assert self.on_stream is not None
        try:
            await self.on_stream(stream)
        finally:
            if self._streams.get(stream.id) is stream and not self.conn.is_active(stream.id):
                self._streams.pop(stream.id, None)
            self._stream_gone()

    def _stream_gone(self) -> None:
        """A stream finished: wake drain(), if it waits."""
        if self._draining:
            self._changed.set()

    def _forget_if_done(self, stream: TunnelStream) -> None:
        if not self.conn.is_active(stream.id) and self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            self._stream_gone()

    def _wake(self, stream_id: int) -> None:
        if stream_id == 0:
            for stream in self._blocked:
                stream._wake_writer()
            self._blocked.clear()
        else:
            waiting = self._streams.get(stream_id)
            if waiting is not None:
                waiting._wake_writer()
                self._blocked.discard(waiting)

    def _watch_head(
        self, stream: TunnelStream, loop: asyncio.AbstractEventLoop, within: float
    ) -> None:
        """Expire ``stream``'s head wait ``within`` seconds from now."""
        deadline = loop.time() + within
        self._head_waits[stream] = deadline
        timer = self._head_timer
        if timer is None:
            timer = self._head_timer = SharedTimer(loop, self._heads_due)
        timer.ensure(deadline)

    def _heads_due(self, now: float) -> float | None:
        nearest: float | None = None
        for stream, deadline in list(self._head_waits.items()):
            if deadline <= now:
                del self._head_waits[stream]
                _expire(stream._response)
            elif nearest is None or deadline < nearest:
                nearest = deadline
        return nearest

    def _close_streams(self, code: ErrorCode, reason: str) -> None:
        if self._head_timer is not None:
            self._head_timer.close()  # it holds _heads_due: the tunnel itself
        self._head_waits.clear()
        self.closed = True
        if not self.close_reason:
            self.close_reason = reason
        self.conn.close_events(code, reason)
        for stream in list(self._streams.values()):
            stream._fail(StreamError(code, reason))
        self._streams.clear()
        self._blocked.clear()
        self._changed.set()

    async def _keepalive(self) -> None:
        """PING every ``ping_interval``; end the tunnel once the peer was silent for
        ``ping_timeout``, checked at that deadline rather than at the next ping."""
        next_ping = time.monotonic()  # ping first: the RTT is known right after the handshake
        pinger: asyncio.Task[None] | None = None
        try:
            while not self.closed:
                now = time.monotonic()
                silent = now - self.last_received
                if silent >= self.ping_timeout:
                    self.log.warning("tunnel.dead", silent_seconds=round(silent, 3))
                    await self._abort("no traffic from peer within ping timeout")
                    return
                if now >= next_ping:
                    next_ping = now + self.ping_interval
                    if pinger is None or pinger.done():  # a stuck write must not pile up PINGs
                        self.conn.ping(time.monotonic_ns())
                        pinger = asyncio.create_task(self._flush_quietly())
                wake = min(next_ping, self.last_received + self.ping_timeout)
                await asyncio.sleep(max(0.0, wake - time.monotonic()))
        finally:
            if pinger is not None:
                pinger.cancel()

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(TransportClosed):
            await self.flush()

    async def _abort(self, reason: str) -> None:
        """End a tunnel whose peer went silent: fail its streams at once, then close the
        transport without waiting behind writes that may never complete."""
        self.close_reason = reason
        self.conn.terminate(ErrorCode.PROTOCOL_ERROR, reason)
        self._close_streams(ErrorCode.PROTOCOL_ERROR, reason)
        with contextlib.suppress(Exception):
            await self.transport.close(CLOSE_CODE_BASE + ErrorCode.PROTOCOL_ERROR, reason[:120])


class _Body:
    """:meth:`TunnelStream.iter_body`'s iterator: a class rather than an async generator, so
    that the module compiles with mypyc."""

    __slots__ = ("_done", "_stream")

    def __init__(self, stream: TunnelStream) -> None:
        self._stream = stream
        self._done = not stream.has_body

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes | memoryview:
        if not self._done:
            chunk = await self._stream.read()
            if chunk:
                return chunk
            self._done = True
        raise StopAsyncIteration
