"""Invoke requests answered by the relay's HTTP protocol itself, below ASGI.

Every caller request crosses ``ANY /v1/connections/{id}/invoke/{path}``. Through ASGI, each one
paid for uvicorn's request cycle task and its ``send`` (a list of messages, two regular
expressions per response header), :class:`relay.fastpath.RelayApp`'s dispatch, the URL and
body limit middleware with its wrapped ``receive`` and ``send``, the activity recorder's
wrapped ``send``, the audit counter's wrapped ``send``, and one message dict per hop for the
head and for every body chunk. Here the relay's HTTP protocol (:func:`relay.limits.http_protocol`)
starts :func:`answer` instead of the ASGI application for an invoke request that needs none
of that: the same authentication, invoke handler, audit row, activity record and request log
line, with the agent's answer written to the caller's connection by :class:`DirectReply`
(status line and headers in one buffer, validated in two regular-expression searches per
response, and the body counted as it goes for the audit row).

The request stays on the ASGI path, unchanged, when it needs a middleware: a URL over
``max_url_bytes`` (414), a body without ``Content-Length`` or over ``max_body_bytes`` (413,
counted as it streams), and every request when forwarded headers are believed from trusted
proxies (uvicorn's proxy-headers middleware). Answers other than a tunnel stream (problems,
online connectors, requests forwarded to another instance) go out through uvicorn's own
``send``, as before.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from starlette.requests import Request
from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

from backhaul.chunks import join_small
from relay import invoke
from relay.activity import INVOKE_PATH, Outcome
from relay.audit import AuditedResponse
from relay.coalesce import CoalescingTransport
from relay.fastpath import RelayApp, finish, is_invoke, respond
from relay.headers import url_length
from relay.problems import problem

log = structlog.get_logger("backhaul.relay.invoke")

#: Chunked body chunks below this size are framed in one buffer; larger ones are written
#: with their framing around them, not copied into it.
_JOIN_BELOW = 16 * 1024
#: Unread request body bytes above which the caller's socket is no longer read (uvicorn's
#: own limit is 64 KiB, below a single 256 KiB read, so it paused after every read).
BODY_HIGH_WATER = 256 * 1024


def eligible(scope: Scope, max_url: int, max_body: int) -> bool:
    """An invoke request the edge limits have nothing to do for: URL within ``max_url``
    bytes, and no body or a ``Content-Length`` one within ``max_body`` (0: no limit)."""
    if not is_invoke(scope):
        return False
    if url_length(scope) > max_url:
        return False
    length: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            if length is not None:
                return False
            length = value
        elif name == b"transfer-encoding":
            return False
    if length is None:
        return True
    if not length.isdigit():
        return False
    return not max_body or int(length) <= max_body


class DirectBody:
    """The request body of a direct invoke request, kept as the parser handed it over.

    uvicorn appends every body piece to a ``bytearray`` and copies it out again as ``bytes``
    for each ``receive``: two copies of every uploaded byte on top of the parser's own, and
    a pause and resume of reading per 256 KiB read. Here the pieces are kept as they came
    and a ``receive`` hands them on: a bulk piece alone and uncopied, small ones joined;
    reading pauses above :data:`BODY_HIGH_WATER`. Everything else is uvicorn's cycle state,
    as its ``receive`` uses it: ``Expect: 100-continue``, ``more_body``, the message event,
    the disconnect."""

    __slots__ = ("chunks", "cycle", "size")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle
        # A pipelined request's body may have arrived before its turn, in uvicorn's buffer.
        self.chunks: list[bytes] = [bytes(cycle.body)] if cycle.body else []
        self.size = len(cycle.body)
        cycle.body = bytearray()

    def feed(self, body: bytes) -> None:
        cycle = self.cycle
        self.chunks.append(body)
        self.size += len(body)
        if self.size > BODY_HIGH_WATER:
            cycle.flow.pause_reading()
        cycle.message_event.set()

    async def receive(self) -> dict[str, Any]:
        cycle = self.cycle
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        chunks = self.chunks
        if not cycle.disconnected and not cycle.response_complete:
            if not chunks:
                cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected or cycle.response_complete:
            return {"type": "http.disconnect"}
        if not chunks:
            body = b""
        else:  # one piece per receive: a bulk one as it came, or a run of small ones joined
            if len(chunks) > 1:
                chunks[:] = join_small(chunks)
            body = chunks.pop(0)
        self.size -= len(body)
        if chunks:
            cycle.message_event.set()  # the rest is here already: the next receive returns
        if self.size <= BODY_HIGH_WATER:
            cycle.flow.resume_reading()
        more = cycle.more_body or bool(chunks)
        return {"type": "http.request", "body": body, "more_body": more}


#: Invoke requests being answered on the direct path in this process.
_answering = 0


async def answer(cycle: RequestResponseCycle, app: RelayApp, body: DirectBody) -> None:
    """Authenticate, invoke, answer and record one invoke request; ``cycle`` is uvicorn's
    state for the request (its flow control, its keep-alive), ``body`` its body."""
    global _answering
    _answering += 1
    try:
        await _answer(cycle, app, body)
    finally:
        _answering -= 1


async def _answer(cycle: RequestResponseCycle, app: RelayApp, body: DirectBody) -> None:
    scope = cycle.scope
    receive = body.receive
    scope["app"] = app  # type: ignore[typeddict-unknown-key]
    path = scope["path"]
    match = INVOKE_PATH.match(path)
    assert match is not None
    connection_id = match.group(1)
    started = time.perf_counter()
    reply = DirectReply(cycle)
    outcome: Outcome = reply
    try:
        response = await respond(Request(scope, receive), connection_id)  # type: ignore[arg-type]
        inner = getattr(response, "inner", None)
        if type(response) is AuditedResponse and type(inner) is invoke.TunnelResponse:
            try:
                await inner.deliver(reply, receive)
            finally:
                response.record(
                    reply.status, reply.sent, reply.declared, reply.started, reply.finished
                )
        else:
            outcome = Outcome(cycle.send)  # type: ignore[arg-type]
            await response(scope, receive, outcome.send)  # type: ignore[arg-type]
    except Exception:
        log.exception("invoke.crashed", connection_id=connection_id)
        if not (reply.started or outcome.started):
            outcome = Outcome(cycle.send)  # type: ignore[arg-type]
            await problem(500, "Internal Server Error", "the relay failed; see its log")(
                scope,  # type: ignore[arg-type]
                receive,
                outcome.send,
            )
    finally:
        # As uvicorn ends an ASGI request: an answer that did not complete ends the
        # connection (the caller cannot tell where it stopped), and the cycle is done.
        if not cycle.response_complete and not cycle.disconnected:
            cycle.transport.close()
        body.chunks.clear()  # a body the answer did not read is not kept until the next one
        cycle.on_response = _nothing
        finish(scope, connection_id, outcome, started)  # type: ignore[arg-type]


def _nothing() -> None:
    return None


class DirectReply(Outcome):
    """Writes an agent's answer to the caller's connection: the :class:`relay.invoke.BodySink`
    of the direct path, and the :class:`relay.activity.Outcome` and audit counts of it."""

    __slots__ = ("bodiless", "chunked", "cycle", "declared", "finished", "remaining", "sent")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        super().__init__(cycle.send)  # type: ignore[arg-type]
        self.cycle = cycle
        #: No body goes out: a HEAD request, or a status that has none (RFC 9110 §6.4.1).
        #: Its Content-Length, if any, describes the representation, not this message.
        self.bodiless = cycle.scope["method"] == "HEAD"
        self.chunked = False
        self.declared: int | None = None
        self.remaining = 0
        self.sent = 0
        self.finished = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        cycle = self.cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        self.status = status
        if cycle.disconnected:
            return
        if cycle.response_started:
            raise RuntimeError("the response has already started")
        if status < 200 or status in (204, 304):
            self.bodiless = True
        content = [STATUS_LINE[status]]
        dated = False
        names: list[bytes] = []
        values: list[bytes] = []
        chunked: bool | None = None
        closes = False
        for name, value in headers:  # lower-case names (relay.headers.raw_response_headers)
            names.append(name)
            values.append(value)
            if name == b"content-length" and chunked is None:
                if not value.isdigit():
                    raise RuntimeError("the agent sent an invalid Content-Length")
                self.declared = self.remaining = int(value)
                chunked = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.remaining = 0
                chunked = True
            elif name == b"connection":
                if b"close" in [token.strip().lower() for token in value.split(b",")]:
                    cycle.keep_alive = False
                    closes = True
            elif name == b"content-type" and b"problem+json" in value:
                self.is_problem = True
            elif name == b"date":
                dated = True
            content += (name, b": ", value, b"\r\n")
        # The server's own fields go first; its Date only when the API's answer has none:
        # Date is a singleton, and a proxy forwards the origin's (RFC 9110 §6.6.1).
        defaults: list[bytes] = []
        for name, value in cycle.default_headers:
            if not (dated and name == b"date"):
                defaults += (name, b": ", value, b"\r\n")
        content[1:1] = defaults
        # What uvicorn checks field by field, in one search over all the names and one over
        # all the values: nothing the agent sends can end a field or the head early.
        if HEADER_RE.search(b"".join(names)) or HEADER_VALUE_RE.search(b"\t".join(values)):
            raise RuntimeError("the agent sent an invalid response header")
        if not cycle.keep_alive and not closes:
            content.append(b"connection: close\r\n")
        if chunked is None and not self.bodiless:
            chunked = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.chunked = bool(chunked)
        self.started = True
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        cycle.transport.write(b"".join(content))

    async def body(self, data: bytes | memoryview, more: bool) -> None:
        cycle = self.cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        if not self.started or cycle.response_complete:
            raise RuntimeError("a body chunk outside a response")
        size = len(data)
        if self.bodiless:
            size = 0
        elif self.chunked:
            tail = b"\r\n" if more else b"\r\n0\r\n\r\n"
            if size >= _JOIN_BELOW:  # a bulk chunk is not copied to frame it
                cycle.transport.writelines((b"%x\r\n" % size, data, tail))
            elif size:
                cycle.transport.write(b"".join((b"%x\r\n" % size, data, tail)))
            elif not more:
                cycle.transport.write(b"0\r\n\r\n")
        else:
            if size > self.remaining:
                raise RuntimeError("the agent's body is longer than its Content-Length")
            self.remaining -= size
            if size:
                cycle.transport.write(data)
        self.sent += size
        if self.is_problem:
            self.keep(data)
        if more:
            return
        self.finished = True
        if self.remaining and not self.bodiless:
            raise RuntimeError("the agent's body is shorter than its Content-Length")
        # The answer is whole. The only one being answered leaves now, not at the end of this
        # loop iteration: the audit row, the activity record and the rest of the request's
        # bookkeeping then run while the caller reads it, instead of before. Under load the
        # answers of one iteration still leave together at its end; written one by one
        # they cost 15 % of the requests per second (bench/PROFILE.md, "The answer first").
        transport = cycle.transport
        if _answering <= 1 and isinstance(transport, CoalescingTransport):
            transport.flush()
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()
