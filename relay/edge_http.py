"""The relay's HTTP/1.1 protocol under httptools, compiled: uvicorn's, with the edge's own parts.

One class holds what used to be three layers of interpreted subclasses built at startup
(uvicorn's protocol, the head limits of :mod:`relay.limits`, the direct invoke path of
:mod:`relay.edge`): the parser callbacks every request runs through, the head timeout and
size limit, the choice of the direct path, and the keep-alive timeout. It is a module-level
class, so mypyc compiles its methods (setup.py); it stays a plain Python class, because its
base is uvicorn's (``_python_class``). :func:`relay.limits.http_protocol` hands uvicorn a
factory of it with the relay's settings (:class:`EdgeSettings`).

What differs from uvicorn's protocol besides being compiled:

- **One timer per connection** for both of its deadlines: the end of a head arriving
  (``header_timeout_seconds``, then ``408``) and the end of an idle keep-alive
  (``timeout_keep_alive``, then the connection is closed). A request only moves the deadline;
  the timer, when it fires, checks the deadline in force and sleeps again until it. uvicorn
  armed and cancelled a keep-alive timer per request.
- **Invoke requests the edge limits have nothing to do for** are answered by
  :func:`relay.edge.answer` instead of the ASGI application (:func:`relay.edge.eligible`),
  with their bodies kept by :class:`relay.edge.DirectBody`.
- **A response's head and body leave in one write**: the caller's transport is a
  :class:`relay.coalesce.CoalescingTransport` until the connection becomes a WebSocket.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import TYPE_CHECKING, Any, TypeVar

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from backhaul.aio.deadlines import SharedTimer
from backhaul.aio.waitflag import WaitFlag
from relay.coalesce import CoalescingTransport
from relay.edge import DirectBody, answer, eligible
from relay.limits import HeadTooLarge, refuse_head, time_out_head

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from relay.fastpath import RelayApp

_C = TypeVar("_C", bound=type)


def _python_class(cls: _C) -> _C:
    """Marks a class mypyc compiles the methods of but keeps a plain Python class (a class
    with a decorator mypyc does not know is not made native). A native class on a Python
    base is what agent/link.py's memory fault is suspected of (setup.py)."""
    return cls


class EdgeSettings:
    """The relay's settings for its HTTP protocol (:func:`relay.limits.http_protocol`)."""

    __slots__ = ("direct_app", "head_timeout", "max_body", "max_head", "max_url")

    def __init__(
        self,
        head_timeout: float = 10.0,
        max_head: int = 32768,
        direct_app: RelayApp | None = None,
        max_url: int = 0,
        max_body: int = 0,
    ) -> None:
        #: Seconds from a request's first byte (or the connection) to the end of its head.
        self.head_timeout = head_timeout
        #: The largest request head, in bytes (request line and fields).
        self.max_head = max_head
        #: The relay application whose invoke requests are answered directly; None: ASGI.
        self.direct_app = direct_app
        #: The edge's URL and body limits (:func:`relay.edge.eligible`).
        self.max_url = max_url
        self.max_body = max_body


@_python_class
class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the relay's edge (see the module docstring).

    Made by uvicorn through ``functools.partial(EdgeHttpProtocol, edge=...)``: a compiled
    method accepts an instance of exactly this class, not of a subclass made at runtime."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        edge: EdgeSettings | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = edge if edge is not None else EdgeSettings()
        self.head_timeout = settings.head_timeout
        self.max_head = settings.max_head
        self.direct_app = settings.direct_app
        self.max_url = settings.max_url
        self.max_body = settings.max_body
        self._deadline: float | None = None
        self._deadline_is_head = False
        self._timer = SharedTimer(self.loop, self._due)
        self._head_bytes = 0
        self._head_too_large = False
        #: The body of the direct request being answered, if any.
        self.direct_body: DirectBody | None = None

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(coalescing)  # type: ignore[arg-type]
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_timer()
        super().connection_lost(exc)
        # References back to this object make it a cycle with what it holds: the timer's
        # callback, and the ``on_response`` of the request cycle, of the direct body's cycle
        # and of pipelined requests that will not be started now.
        # A cycle waits for the collector's full collection, which a relay moving bulk data
        # seldom makes, and this one holds the connection's TLS object and its 256 KiB read
        # buffer. Nothing asks for them after the connection is lost (a task still answering
        # holds its own request cycle), so they are let go here, and the connection is freed
        # as soon as its last task ends (hence _close_timer above).
        self.cycle = None  # type: ignore[assignment]
        self.direct_body = None
        self.pipeline.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)

    def handle_websocket_upgrade(self) -> None:
        # The connection becomes a tunnel: the WebSocket protocol writes to the transport
        # itself, held back by nothing. This object is done with; its timer and its parser
        # would keep it alive in cycles (see connection_lost).
        self._close_timer()
        transport = self.transport
        if isinstance(transport, CoalescingTransport):
            transport.flush()
            self.transport = transport.transport
        super().handle_websocket_upgrade()
        self.parser = None  # type: ignore[assignment]  # a cycle, as in connection_lost

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            refuse_head(self.transport, self.client, self.max_head)
        else:
            super().send_400_response(msg)

    # ------------------------------------------------------------------ deadlines

    def _expect_head(self) -> None:
        """A head is due: by ``head_timeout`` from now, unless one is due already."""
        if self._deadline is not None and self._deadline_is_head:
            return
        if self.transport.is_closing():
            return
        self._set_deadline(self.head_timeout, True)

    def _set_deadline(self, seconds: float, head: bool) -> None:
        # A timer armed for an earlier deadline stays: it fires first and sleeps again.
        deadline = self._deadline = self.loop.time() + seconds
        self._deadline_is_head = head
        self._timer.ensure(deadline)

    def _close_timer(self) -> None:
        """No deadline from now on, and the timer lets go of this object (SharedTimer.close)."""
        self._deadline = None
        self._timer.close()

    def _due(self, now: float) -> float | None:
        """The timer fired: settle the deadline if it has passed (SharedTimer)."""
        deadline = self._deadline
        if deadline is None:
            return None  # nothing due; the next deadline arms the timer again
        if now < deadline:
            return deadline
        self._deadline = None
        transport = self.transport
        if not transport.is_closing():
            if self._deadline_is_head:
                time_out_head(transport, self.client, self.head_timeout)
            else:
                transport.close()  # an idle keep-alive connection
        return None

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        headers: list[tuple[bytes, bytes]] = []
        self.headers = headers
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": headers,
            "state": self.app_state.copy(),
        }
        self._head_bytes = 0
        self._expect_head()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        name = name.lower()
        # llhttp keeps trailing whitespace, which is not part of the value (RFC 9110 §5.5).
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head:
            self._head_too_large = True
            raise HeadTooLarge  # the parser stops; data_received sends the refusal

    def on_headers_complete(self) -> None:
        self._deadline = None  # the head is whole
        parser = self.parser
        scope: Any = self.scope
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        # Any: the stubs say bytes where httptools gives None (no query), and mypyc checks.
        parsed: Any = httptools.parse_url(self.url)
        raw_path: bytes = parsed.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root_path: str = self.root_path
        scope["path"] = root_path + path
        scope["raw_path"] = root_path.encode("ascii") + raw_path if root_path else raw_path
        scope["query_string"] = parsed.query or b""
        limit = self.limit_concurrency
        app: ASGI3Application = self.app
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        existing: RequestResponseCycle | None = self.cycle  # None before the first request
        cycle = self.cycle = RequestResponseCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            # asyncio.Event's interface without its interpreted code (three calls a request).
            message_event=WaitFlag(),  # type: ignore[arg-type]
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, app)
        else:  # a pipelined request waits for the one before it
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        direct = self.direct_app
        # ``app`` is uvicorn's 503 answer past limit_concurrency: that one stands.
        if (
            direct is not None
            and app is self.app
            and eligible(cycle.scope, self.max_url, self.max_body)  # type: ignore[arg-type]
        ):
            body = self.direct_body = DirectBody(cycle)
            task = self.loop.create_task(answer(cycle, direct, body))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
            return
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        if self.parser.should_upgrade() and self._should_upgrade():
            return  # an upgrade's (there may be no cycle yet)
        cycle = self.cycle
        if cycle.response_complete:
            return  # a body after the answer
        direct = self.direct_body
        if direct is not None and direct.cycle is cycle:
            direct.feed(body)
            return
        cycle.body += body  # an ASGI request, or a pipelined one not started yet
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        cycle = self.cycle
        if cycle.response_complete:
            return
        cycle.more_body = False
        cycle.message_event.set()

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        flow = self.flow
        if flow.read_paused:  # resume_reading checks this too, in an interpreted frame
            flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._deadline is None:  # not while the next request's head is arriving
            self._set_deadline(self.timeout_keep_alive, False)
