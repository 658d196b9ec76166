"""Recent invoke activity of this relay instance, for the admin page: requests per minute and
the last errors, per connection (the admin page maps connections to gateways).

An ASGI middleware watches ``/v1/connections/{id}/invoke/...`` responses as they pass (status
and, for an error, the RFC 9457 body's title and detail), so the invoke path itself carries no
bookkeeping. Memory is bounded: a minute of per-second counts for each connection invoked in
it, and the last :data:`MAX_ERRORS` errors. Nothing of the request is kept but the connection id,
the status and the problem text the caller saw — never a header, a query or a body.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

WINDOW_SECONDS = 60.0
MAX_ERRORS = 50
_PROBLEM_BYTES = 4096
INVOKE_PATH = re.compile(r"^/v1/connections/([A-Za-z0-9_\-]+)/invoke(?:/|$)")


@dataclass(frozen=True)
class ErrorEvent:
    at: float  # wall clock (time.time())
    connection_id: str
    status: int
    title: str
    detail: str


class Activity:
    """The sliding window of invokes and the ring of recent errors."""

    def __init__(self) -> None:
        #: One entry per second with invokes in the window, oldest first: the second, and per
        #: connection [requests, failed requests]. One tuple per request instead held up to a
        #: 200,000-entry cap (about 20 MiB under load, and a window cut short above 3,333
        #: requests/s; bench/PROFILE.md, "The relay's memory under load").
        self._seconds: deque[tuple[int, dict[str, list[int]]]] = deque()
        self.errors: deque[ErrorEvent] = deque(maxlen=MAX_ERRORS)

    def record(self, connection_id: str, status: int, title: str = "", detail: str = "") -> None:
        failed = 1 if status >= 500 or status in (401, 403, 404, 429) else 0
        now = time.monotonic()
        second = int(now)
        seconds = self._seconds
        if not seconds or seconds[-1][0] != second:
            seconds.append((second, {}))
            self._forget(now)
        counts = seconds[-1][1]
        entry = counts.get(connection_id)
        if entry is None:
            counts[connection_id] = [1, failed]
        else:
            entry[0] += 1
            entry[1] += failed
        if status >= 400:
            self.errors.append(ErrorEvent(time.time(), connection_id, status, title, detail))

    def _forget(self, now: float) -> None:
        """Drop the seconds that ended before the window began."""
        cutoff = now - WINDOW_SECONDS
        seconds = self._seconds
        while seconds and seconds[0][0] + 1 <= cutoff:
            seconds.popleft()

    def last_minute(self) -> dict[str, tuple[int, int]]:
        """Per connection: (requests, failed requests) in the last :data:`WINDOW_SECONDS`
        (counted by whole seconds: the oldest second may have begun up to one second before)."""
        self._forget(time.monotonic())
        counts: dict[str, tuple[int, int]] = {}
        for _second, per_connection in self._seconds:
            for connection_id, (requests, failed) in per_connection.items():
                total, errors = counts.get(connection_id, (0, 0))
                counts[connection_id] = (total + requests, errors + failed)
        return counts


class Recorder:
    """Pure ASGI middleware (nothing is buffered but the first 4 KiB of an error body)."""

    def __init__(self, app: ASGIApp, activity: Activity) -> None:
        self.app = app
        self.activity = activity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INVOKE_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        outcome = Outcome(send)
        try:
            await self.app(scope, receive, outcome.send)
        finally:
            self.activity.record(match.group(1), *outcome.summary())


class Outcome:
    """Watches a response as it passes: its status, whether it started, and the title and
    detail of an RFC 9457 problem body (its first 4 KiB only)."""

    __slots__ = ("_problem", "_send", "is_problem", "started", "status")

    def __init__(self, send: Send) -> None:
        self._send = send
        self._problem = bytearray()
        self.status = 500
        self.started = False
        self.is_problem = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = int(message["status"])
            for name, value in message.get("headers", []):
                if name.lower() == b"content-type" and b"problem+json" in value:
                    self.is_problem = True
        elif message["type"] == "http.response.body" and self.is_problem:
            self.keep(message.get("body", b""))
        await self._send(message)

    def keep(self, body: bytes | memoryview) -> None:
        """Keep the start of a problem body (up to 4 KiB in all) for :meth:`summary`."""
        room = _PROBLEM_BYTES - len(self._problem)
        if room > 0:
            self._problem.extend(body[:room])

    def summary(self) -> tuple[int, str, str]:
        """(status, problem title, problem detail) for :meth:`Activity.record`."""
        title, detail = problem_text(bytes(self._problem)) if self.is_problem else ("", "")
        return self.status, title, detail


def problem_text(body: bytes) -> tuple[str, str]:
    try:
        doc = json.loads(body)
    except ValueError:
        return "", ""
    if not isinstance(doc, dict):
        return "", ""
    return str(doc.get("title", ""))[:200], str(doc.get("detail", ""))[:500]
