"""A lean HTTP/1.1 client for the agent's calls to internal APIs.

Most upstream calls are small requests to a handful of origins. A general-purpose client
(httpx on httpcore on anyio) spends more CPU on its own layers than on the request, so the
common case runs here instead: :class:`asyncio.Protocol` connections parsed by httptools
(llhttp), a keep-alive pool per origin, and no task, lock or per-header object beyond the
list the caller gets. Auth flows that need several legs (httpx.Auth, NTLM, Negotiate) stay on
httpx; see :mod:`agent.executor`.

What the client guarantees:

- Framing (RFC 9112 §6): it owns ``Host`` (RFC 9110 §7.2, the port only when it is not the
  scheme's default) and the body framing. A body is sent with the caller's ``Content-Length``
  when the headers carry one, else chunked (§7.1); a body that runs over or stops short of the
  declared length is :class:`~agent.errors.BadRequestHead` and the connection is closed. POST,
  PUT and PATCH without a body get ``Content-Length: 0`` (RFC 9110 §8.6), as httpx does.
- The head goes out in one write; body writes wait while the transport is paused.
- The response: 1xx interim responses are skipped (RFC 9110 §15.2); HEAD answers and 204/304
  have no body (RFC 9112 §6.3); chunked is de-chunked but content codings pass through; a body
  with neither length nor chunked ends at EOF. Reading pauses when more than
  :data:`READ_HIGH_WATER` bytes are buffered and unread. The rest of a Content-Length body
  longer than :data:`RAW_BODY_MIN` is counted off the socket's reads instead of parsed (no
  copy per piece), and buffered pieces of 64 KiB or more are handed on without joining.
- Persistence (RFC 9112 §9.3): a connection goes back to its origin's pool (LIFO, so the
  warmest one is reused and the others age out after :data:`KEEPALIVE_EXPIRY` seconds, as in
  httpcore) only when the whole response came off the wire, neither side asked to close, and
  the request was sent in full. Anything else (an error, a cancelled task, a body not read to
  its end) closes it. A reused connection the server closed before answering an idempotent
  request without a body is retried once on another connection (§9.3.1), the race a
  keep-alive timeout on the server side makes inevitable.
- Timeouts: connecting (TCP and TLS) is bounded by the connect timeout and the request's own
  timeout; everything up to the response head by the request's timeout; while the body
  streams the same timeout is the longest silence allowed.

Errors are the agent's own (:mod:`agent.errors`); messages name the target without its query
string, and any exception text in them goes through :func:`backhaul.logging.redact_text`::

    UpstreamUnreachable   DNS, TCP connect, TLS handshake or certificate failure, connect timeout
    UpstreamTimeout       no free connection, no response head or a silent body within the timeout
    UpstreamError         the server broke HTTP: unparsable response, closed early
    BadRequestHead        the request cannot be framed as given (Content-Length mismatch)

Header names and values are sent as given: the caller has validated them (the relay's OPEN
head is checked by :mod:`agent.head`); a CR or LF that slipped through is still refused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import cast

import httptools

from agent.errors import BadRequestHead, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from agent.policy import DEFAULT_PORTS, NormalizedURL
from backhaul.aio.deadlines import SharedTimer
from backhaul.chunks import join_small
from backhaul.logging import redact_text

__all__ = [
    "KEEPALIVE_EXPIRY",
    "MAX_RESPONSE_HEAD",
    "RAW_BODY_MIN",
    "READ_HIGH_WATER",
    "Client",
    "Response",
    "reason",
]

#: Unread response bytes above which the socket is no longer read.
READ_HIGH_WATER = 256 * 1024
#: Seconds an idle connection stays reusable (httpcore's default; servers often close at 5 s).
KEEPALIVE_EXPIRY = 5.0
#: Largest response head accepted (httpcore's limit), so a hostile API cannot fill memory.
MAX_RESPONSE_HEAD = 100 * 1024
#: Methods whose request may be repeated without changing its effect (RFC 9110 §9.2.2).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_EMPTY_BODY_DEFAULTS = frozenset({"POST", "PUT", "PATCH"})
#: A chunk this small is copied behind its chunk-size line; a larger one is written as is.
_COPY_LIMIT = 16 * 1024
#: Body bytes still to come, with a Content-Length, above which the rest of the body is taken
#: from the socket as it is read instead of through the parser (which copies every piece).
RAW_BODY_MIN = 64 * 1024


def reason(exc: BaseException) -> str:
    """The first line of an exception's text, redacted and bounded: safe for a message."""
    text = str(exc) or type(exc).__name__
    return redact_text(text.splitlines()[0])[:300]


def _time_up(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the answer."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; the parser's callbacks fill the current response."""

    __slots__ = (
        "_body",
        "_buffered",
        "_busy",
        "_closed",
        "_complete",
        "_counted",
        "_deadline",
        "_error",
        "_head_bytes",
        "_head_done",
        "_head_only",
        "_headers",
        "_idle",
        "_keep_alive",
        "_loop",
        "_origin",
        "_parser",
        "_raw_checked",
        "_raw_left",
        "_read_paused",
        "_received",
        "_seen",
        "_status",
        "_timer",
        "_transport",
        "_waiter",
        "_where",
        "_write_paused",
        "idle_since",
        "requests",
    )

    def __init__(self, origin: _Origin) -> None:
        self._origin = origin
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[object] | None = None
        self._deadline = 0.0  # of the current wait
        self._timer = SharedTimer(self._loop, self._on_timer)
        self._body: list[bytes] = []
        self._buffered = 0
        self._headers: list[tuple[str, str]] = []
        self._status = 0
        self._head_bytes = 0
        self._head_done = False
        self._head_only = False
        self._complete = False
        self._keep_alive = True
        self._received = False
        self._error: Exception | None = None
        self._where = origin.display
        self._busy = False
        self._idle = False
        self._closed = False
        self._counted = False  # in the origin's total: set once the client adopts it
        self._read_paused = False
        self._write_paused = False
        self._seen = 0  # body bytes of the current response so far
        self._raw_checked = False
        self._raw_left = 0  # > 0: the rest of the body comes straight from the socket
        self.idle_since = 0.0
        self.requests = 0

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport, so no isinstance.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._raw_left:
            self._raw_body(data)
            return
        if not self._busy or self._error is not None or self._parser is None:
            # Bytes nobody asked for (a 408 before an idle close, a body after a HEAD
            # answer): the framing of this connection can no longer be trusted.
            self._fail(None)
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            self._fail(self._broke(reason(cause or exc)))
            return
        if not self._head_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_RESPONSE_HEAD:
                self._fail(self._broke(f"response head larger than {MAX_RESPONSE_HEAD} bytes"))
        elif not self._complete and not self._raw_checked:
            self._arm_raw()

    def _arm_raw(self) -> None:
        """A body longer than one read: with a Content-Length, take the rest unparsed.

        llhttp hands every body piece to :meth:`on_body` as a new bytes object, a copy of
        what the socket gave; for a large body that copy is most of the parser's cost. Once
        the head is parsed and the length is known, the bytes still due are the body and
        nothing else, so they are counted off the reads as they come. The parser is then
        behind the stream and is replaced before the connection's next exchange."""
        self._raw_checked = True
        length = _content_length(self._headers)
        if length is not None and length - self._seen >= RAW_BODY_MIN:
            self._raw_left = length - self._seen

    def _raw_body(self, data: bytes) -> None:
        if not self._busy or self._error is not None:
            self._raw_left = 0
            self._fail(None)
            return
        self._received = True
        left = self._raw_left
        if len(data) < left:
            self._raw_left = left - len(data)
            self.on_body(data)
            return
        if len(data) > left:
            # Bytes past the declared body: a second answer nobody asked for.
            self._keep_alive = False
            data = data[:left]
        self._raw_left = 0
        self._parser = None  # behind the stream: begin() makes a new one
        self.on_body(data)
        self._complete = True
        self._wake()

    def eof_received(self) -> bool | None:
        if self._head_done and not self._complete and _delimited_by_close(self._headers):
            # RFC 9112 §6.3 (8): no length and not chunked, so the close ends the body.
            self._complete = True
            self._keep_alive = False
            self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._parser = None  # the parser holds bound methods of this object
        if self._busy and not self._complete and self._error is None:
            if not self._head_done and not self._received and self.requests > 1:
                self._error = _Stale()
            else:
                why = reason(exc) if exc is not None else "connection closed"
                self._error = self._broke(
                    f"{why} before the body was complete"
                    if self._head_done
                    else f"{why} before a response"
                )
        self._wake()
        self._drop()
        # Every wait checks _closed first, so the timer is done with too; its callback is a
        # bound method of this object, a cycle as the parser's were.
        self._timer.close()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head_done:
            # A second response to one request: nothing on this connection can be trusted.
            self._keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # trailer fields (RFC 9112 §7.1.2) are dropped, as httpx does
            self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self._head_done:
            return
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise ValueError("the server switched protocols without being asked")
            self._headers = []  # an interim response (RFC 9110 §15.2)
            return
        self._status = status
        self._head_done = True
        self._keep_alive = self._keep_alive and parser.should_keep_alive()
        if self._head_only:
            # llhttp cannot be told that a HEAD answer has no body (RFC 9110 §9.3.2), so it
            # would wait for the Content-Length bytes: this parser is done, the next one new.
            self._complete = True
            self._parser = None
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            self._keep_alive = False
            return
        self._body.append(body)
        self._seen += len(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head_done and not self._complete:
            self._complete = True
            self._wake()

    # -- used by the client and the response --------------------------------------------

    def _broke(self, why: str) -> UpstreamError:
        phase = "sending the response body" if self._head_done else "answering"
        return UpstreamError(f"{self._where} broke HTTP while {phase}: {why}")

    def _fail(self, error: Exception | None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._keep_alive = False
        self._wake()
        self.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def wait(self, deadline: float) -> bool:
        """Until the next event (True) or the deadline (False).

        One timer per connection rather than one per wait, which would cost more than the
        rest of a small exchange's waiting: it stays armed from one wait to the next, and
        when it fires for a deadline that has since moved later it re-arms for the new one.
        """
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._deadline = deadline
        self._timer.ensure(deadline)
        try:
            return bool(await waiter)
        finally:
            self._waiter = None

    def _on_timer(self, now: float) -> float | None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return None  # no wait in progress: the next one arms the timer again
        if now >= self._deadline:
            waiter.set_result(False)
            return None
        return self._deadline

    def begin(self, where: str, head_only: bool) -> None:
        self._where = where
        self._head_only = head_only
        self._busy = True
        self.requests += 1
        self._seen = 0
        self._raw_checked = False
        if self._parser is None:
            self._parser = httptools.HttpResponseParser(self)

    def write(self, data: bytes) -> None:
        if not self._closed:
            assert self._transport is not None
            self._transport.write(data)

    async def send_body(
        self,
        head: bytes,
        first: bytes | memoryview | None,
        body: AsyncIterator[bytes | memoryview],
        length: int | None,
        deadline: float,
    ) -> None:
        """Write the head and the body; ``length`` None means chunked (RFC 9112 §7.1)."""
        transport = self._transport
        assert transport is not None
        pending = head
        sent = 0
        chunk = first
        while chunk is not None:
            if chunk:
                n = len(chunk)
                if length is None:
                    size = b"%x\r\n" % n
                    if n <= _COPY_LIMIT:
                        transport.write(b"".join((pending, size, chunk, b"\r\n")))
                    else:
                        transport.writelines((pending, size, chunk, b"\r\n"))
                else:
                    sent += n
                    if sent > length:
                        raise BadRequestHead(
                            "request could not be sent as given: the body is longer than its "
                            f"Content-Length of {length} bytes"
                        )
                    if n <= _COPY_LIMIT:
                        transport.write(pending + chunk)
                    else:
                        if pending:
                            transport.write(pending)
                        transport.write(chunk)
                pending = b""
                if self._write_paused and not await self._drain(deadline):
                    return
                if self._closed:
                    self._keep_alive = False
                    return
            chunk = await anext(body, None)
            if self._loop.time() > deadline:
                raise self._timeout("sending the request")
        if length is None:
            self.write(pending + b"0\r\n\r\n")
        elif sent < length:
            raise BadRequestHead(
                "request could not be sent as given: the body is shorter than its "
                f"Content-Length ({sent} of {length} bytes)"
            )
        elif pending:
            self.write(pending)

    async def _drain(self, deadline: float) -> bool:
        """Wait for the transport to take more; False when sending should stop."""
        while self._write_paused:
            if self._closed or self._head_done:
                # The server answered (or left) before taking the whole body: stop sending;
                # the request is incomplete, so the connection is not reused.
                self._keep_alive = False
                return False
            if not await self.wait(deadline):
                raise self._timeout("sending the request")
        return True

    async def wait_head(self, deadline: float) -> None:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise self._broke("connection closed before a response")
            if not await self.wait(deadline):
                raise self._timeout("waiting for the response head")

    def _timeout(self, phase: str) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self._where} did not answer in time ({phase})")

    def take(self) -> list[bytes]:
        """The buffered body, bulk pieces as they came (:func:`backhaul.chunks.join_small`)."""
        chunks = self._body
        pieces = [chunks[0]] if len(chunks) == 1 else join_small(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused:
            self._read_paused = False
            if not self._closed:
                assert self._transport is not None
                self._transport.resume_reading()
        return pieces

    def release(self) -> None:
        """Back to the pool when the exchange ended cleanly, else closed."""
        self._busy = False
        if (
            not self._complete
            or not self._keep_alive
            or self._closed
            or self._error is not None
            or self._origin.closed
        ):
            self.abort()
            return
        self._body.clear()
        self._buffered = 0
        self._headers = []
        self._head_done = self._complete = self._received = False
        self._head_bytes = 0
        self._origin.put(self)

    def abort(self) -> None:
        self._busy = False
        self._keep_alive = False
        if self._transport is not None and not self._closed:
            self._transport.abort()
        self._drop()

    def close(self) -> None:
        """Close politely (an idle connection: nothing is lost)."""
        if self._transport is not None and not self._closed:
            self._transport.close()
        self._drop()

    def _drop(self) -> None:
        self._timer.cancel()
        if self._counted:
            self._counted = False
            self._origin.forget(self)


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    """The body's length when a valid Content-Length alone frames it (llhttp has checked
    the value and refused conflicting ones); None when chunked or not given."""
    length: int | None = None
    for name, value in headers:
        if name == "transfer-encoding":
            return None
        if name == "content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length


def _delimited_by_close(headers: list[tuple[str, str]]) -> bool:
    framed = False
    for name, value in headers:
        if name == "content-length":
            return False
        if name == "transfer-encoding":
            framed = value.rsplit(",", 1)[-1].strip().lower() == "chunked"
    return not framed


_SHUT = object()


class _Origin:
    """The pool of one (scheme, host, port): idle connections, a slot count, the waiters."""

    __slots__ = (
        "closed",
        "display",
        "host",
        "host_line",
        "idle",
        "limit",
        "port",
        "server_hostname",
        "ssl",
        "total",
        "waiters",
    )

    def __init__(self, url: NormalizedURL, limit: int, context: ssl.SSLContext | None) -> None:
        self.host = url.host
        self.port = url.port
        self.display = url.origin
        self.ssl = context if url.scheme == "https" else None
        self.server_hostname = url.host if self.ssl is not None else None
        authority = f"[{url.host}]" if ":" in url.host else url.host
        if url.port != DEFAULT_PORTS.get(url.scheme):
            authority = f"{authority}:{url.port}"
        self.host_line = f"Host: {authority}\r\n"
        self.limit = limit
        self.idle: list[_Connection] = []
        self.total = 0  # open connections plus those being opened
        self.waiters: deque[asyncio.Future[object]] = deque()
        self.closed = False

    def take_idle(self, now: float) -> _Connection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            conn._idle = False
            transport = conn._transport
            if transport is None or transport.is_closing():
                conn.close()  # closed by the server; connection_lost is on its way
                continue
            if now - conn.idle_since > KEEPALIVE_EXPIRY:
                # LIFO: every connection below this one has waited even longer.
                for old in (conn, *idle):
                    old._idle = False
                    old.close()
                idle.clear()
                return None
            return conn
        return None

    def put(self, conn: _Connection) -> None:
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(conn)
            return
        conn.idle_since = conn._loop.time()
        conn._idle = True
        self.idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        if conn._idle:
            conn._idle = False
            self.idle.remove(conn)
        self.total -= 1
        self.grant()

    def grant(self) -> None:
        """Hand a free slot to the first waiter, which then opens a connection."""
        if self.total < self.limit:
            waiter = self._next_waiter()
            if waiter is not None:
                self.total += 1
                waiter.set_result(None)

    def _next_waiter(self) -> asyncio.Future[object] | None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    def hand_back(self, got: object) -> None:
        """A waiter that was given a connection or a slot is gone: pass it on."""
        if isinstance(got, _Connection):
            got.release()
        elif got is None:
            self.total -= 1
            self.grant()

    def shut(self) -> None:
        self.closed = True
        while self.waiters:  # first, so no freed slot is granted to a waiter
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(_SHUT)
        for conn in list(self.idle):
            conn.close()


class Response:
    """Status and headers as received; the body from :meth:`aiter_bytes`, once.

    ``headers`` are (lower-case name, value) decoded as latin-1, in order, hop-by-hop fields
    included. :meth:`aclose` must be called (or the body read to its end) to give the
    connection back; closing early closes the connection instead.
    """

    __slots__ = ("_body", "_conn", "_timeout", "bytes_received", "headers", "status")

    def __init__(self, conn: _Connection, timeout: float) -> None:
        self._conn: _Connection | None = conn
        self._timeout = timeout
        self.status = conn._status
        self.headers = conn._headers
        self.bytes_received = 0
        self._body: ResponseBody | None = None

    @property
    def body_ready(self) -> bool:
        """True when body bytes (or the end of the body) are here already: reading them
        will not wait for the network."""
        conn = self._conn
        return conn is None or bool(conn._body) or conn._complete

    def aiter_bytes(self) -> ResponseBody:
        """The body as it arrives, minus the transfer coding, content codings intact."""
        return ResponseBody(self)

    async def next_chunk(self) -> bytes | None:
        """The body's next piece, None at its end: :meth:`aiter_bytes` read one at a time
        (``agent.executor.UpstreamResponse``)."""
        body = self._body
        if body is None:
            body = self._body = ResponseBody(self)
        piece = await body.next_piece()
        if piece is None:
            self._body = None  # the two refer to each other: a cycle only the collector frees
        return piece

    async def aclose(self) -> None:
        self._body = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release()


class ResponseBody:
    """The body iterator of a :class:`Response`.

    A class rather than an async generator, so that the module compiles with mypyc. Reading
    to the end gives the connection back to the pool; a read that fails or is cancelled
    closes it (a late reader must never touch a connection that :meth:`Response.aclose`
    already handed to another request); stopping early leaves that to ``aclose()``.
    """

    __slots__ = ("_conn", "_next", "_pieces", "_response")

    def __init__(self, response: Response) -> None:
        self._response = response
        self._conn = response._conn
        self._pieces: list[bytes] = []
        self._next = 0

    def __aiter__(self) -> ResponseBody:
        return self

    async def __anext__(self) -> bytes:
        piece = await self.next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def next_piece(self) -> bytes | None:
        """The next piece of the body, or None at its end: the end without an exception,
        which compiled code pays for with a traceback entry per frame it leaves."""
        if self._next < len(self._pieces):
            return self._piece()
        response, conn = self._response, self._conn
        if conn is None:
            return None
        try:
            while response._conn is conn:  # aclose() may have given the connection back
                if conn._body:
                    self._pieces, self._next = conn.take(), 0
                    return self._piece()
                if conn._complete:
                    break
                if conn._error is not None:
                    raise conn._error
                if conn._closed:
                    raise conn._broke("connection closed before the body was complete")
                if not await conn.wait(conn._loop.time() + response._timeout):
                    raise conn._timeout("sending the response body")
        except BaseException:
            self._conn = None
            if response._conn is conn:
                response._conn = None
                conn.abort()
            raise
        self._conn = None
        if response._conn is conn:
            response._conn = None
            conn.release()
        return None

    def _piece(self) -> bytes:
        data = self._pieces[self._next]
        self._next += 1
        self._response.bytes_received += len(data)
        return data


class Client:
    """A keep-alive HTTP/1.1 client: one pool of at most ``max_connections`` per origin.

    ``ssl_context`` is used for https origins (pass one with verification off to skip it;
    there is no implicit default). ``opened`` counts the connections ever opened.
    """

    __slots__ = ("_closed", "_connect_timeout", "_context", "_limit", "_origins", "opened")

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        max_connections: int = 100,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._context = ssl_context
        self._connect_timeout = connect_timeout
        self._limit = max_connections
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._closed = False
        self.opened = 0

    def idle(self, url: NormalizedURL) -> int:
        """How many idle connections the pool of ``url``'s origin holds."""
        origin = self._origins.get((url.scheme, url.host, url.port))
        return len(origin.idle) if origin is not None else 0

    async def request(
        self,
        method: str,
        url: NormalizedURL,
        headers: Sequence[tuple[str, str]],
        body: AsyncIterator[bytes | memoryview] | None = None,
        *,
        timeout: float,  # noqa: ASYNC109 - it outlives this call: the body's silence limit
        query: str | None = None,
    ) -> Response:
        """Send one request; return once the response head is in.

        ``timeout`` bounds everything up to the response head, then each wait for the body,
        which a caller's ``asyncio.timeout`` around this call could not do.

        ``query`` replaces ``url.query`` when given (credentials may live there, which is why
        messages name ``url.display()`` only). ``body`` is read as it is sent; an exception it
        raises propagates unchanged.
        """
        if self._closed:
            raise UpstreamUnreachable(f"cannot reach {url.display()}: the client is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        key = (url.scheme, url.host, url.port)
        origin = self._origins.get(key)
        if origin is None:
            if url.scheme == "https" and self._context is None:
                raise UpstreamUnreachable(f"cannot reach {url.display()}: no TLS context")
            origin = self._origins[key] = _Origin(url, self._limit, self._context)
        query = url.query if query is None else query
        target = f"{url.path}?{query}" if query else url.path
        where = origin.display + url.path  # url.display(), without its interpreted frames
        first: bytes | memoryview | None = None
        if body is not None:
            first = await anext(body, None)
        head, length = _encode_head(method, target, origin.host_line, headers, body is not None)
        retry = body is None and method in _IDEMPOTENT
        while True:
            conn = await self._acquire(origin, deadline, where)
            try:
                conn.begin(where, method == "HEAD")
                if body is None:
                    conn.write(head)
                else:
                    await conn.send_body(head, first, body, length, deadline)
                await conn.wait_head(deadline)
            except _Stale:
                if retry:
                    retry = False
                    continue
                raise UpstreamError(
                    f"{where} broke HTTP while answering: it closed a kept-alive connection "
                    "before a response"
                ) from None
            except BaseException:
                conn.abort()
                raise
            return Response(conn, timeout)

    async def _acquire(self, origin: _Origin, deadline: float, where: str) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = origin.take_idle(loop.time())
        if conn is not None:
            return conn
        if origin.total < origin.limit:
            origin.total += 1
            return await self._open(origin, deadline, where)
        waiter: asyncio.Future[object] = loop.create_future()
        origin.waiters.append(waiter)
        timer = loop.call_at(deadline, _time_up, waiter)
        try:
            got = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                origin.hand_back(waiter.result())
            raise
        finally:
            timer.cancel()
        if isinstance(got, _Connection):
            return got
        if got is None:
            return await self._open(origin, deadline, where)
        if got is _SHUT:
            raise UpstreamUnreachable(f"cannot reach {where}: the client is closed")
        raise UpstreamTimeout(
            f"{where} did not answer in time (all {origin.limit} connections to "
            f"{origin.display} stayed busy)"
        )

    async def _open(self, origin: _Origin, deadline: float, where: str) -> _Connection:
        """Open a connection in a slot already counted in ``origin.total``."""
        loop = asyncio.get_running_loop()
        budget = min(self._connect_timeout, deadline - loop.time())
        try:
            try:
                async with asyncio.timeout(budget):
                    _, conn = await loop.create_connection(
                        partial(_Connection, origin),
                        origin.host,
                        origin.port,
                        ssl=origin.ssl,
                        server_hostname=origin.server_hostname,
                    )
            except TimeoutError:
                raise UpstreamUnreachable(f"cannot reach {where}: connection timed out") from None
            except OSError as exc:  # refused, DNS, TLS handshake and certificate errors
                raise UpstreamUnreachable(f"cannot reach {where}: {reason(exc)}") from exc
        except BaseException:
            origin.hand_back(None)
            raise
        self.opened += 1
        if conn._closed:
            origin.hand_back(None)
            raise UpstreamUnreachable(f"cannot reach {where}: connection closed while opening")
        conn._counted = True
        return conn

    async def aclose(self) -> None:
        """Close every idle connection; busy ones close when their response is done."""
        self._closed = True
        for origin in self._origins.values():
            origin.shut()


def _encode_head(
    method: str,
    target: str,
    host_line: str,
    headers: Sequence[tuple[str, str]],
    has_body: bool,
) -> tuple[bytes, int | None]:
    """The request head, and the body length to enforce (None: chunked)."""
    parts = [method, " ", target, " HTTP/1.1\r\n", host_line]
    declared: str | None = None
    for name, value in headers:
        low = name.lower()
        if low == "content-length":
            value = value.strip()
            if declared is not None and value != declared:
                raise BadRequestHead(
                    "request could not be sent as given: conflicting Content-Length fields"
                )
            declared = value
        elif low != "host" and low != "transfer-encoding":
            parts.append(f"{name}: {value}\r\n")
    length: int | None = None
    if declared is not None:
        if not (declared.isdigit() and declared.isascii() and len(declared) <= 18):
            raise BadRequestHead("request could not be sent as given: invalid Content-Length")
        length = int(declared)
        if not has_body and length:
            raise BadRequestHead(
                "request could not be sent as given: the body is shorter than its "
                f"Content-Length (0 of {length} bytes)"
            )
        parts.append(f"Content-Length: {length}\r\n")
    elif has_body:
        parts.append("Transfer-Encoding: chunked\r\n")
    elif method in _EMPTY_BODY_DEFAULTS:
        parts.append("Content-Length: 0\r\n")
        length = 0
    parts.append("\r\n")
    text = "".join(parts)
    lines = len(parts) - 3  # request line, Host, one per header, framing, blank line
    if text.count("\n") != lines or text.count("\r") != lines:
        raise BadRequestHead("request could not be sent as given: CR or LF in a header")
    try:
        return text.encode("latin-1"), length
    except UnicodeEncodeError:
        raise BadRequestHead(
            "request could not be sent as given: a header is not latin-1"
        ) from None
