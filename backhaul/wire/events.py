"""Events the sans-I/O connection reports to its adapter, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backhaul.wire.errors import ErrorCode


class Event:
    """Base class of every event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WelcomeReceived(Event):
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream with a request head (agent side)."""

    stream_id: int
    head: dict[str, Any]
    end_stream: bool


@dataclass(frozen=True, slots=True)
class ResponseReceived(Event):
    """The response head for a stream we opened (relay side)."""

    stream_id: int
    head: dict[str, Any]
    end_stream: bool


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Body bytes. Call ``Connection.acknowledge(stream_id, len(data))`` once consumed.

    A bulk payload is a read-only view of the message it came in, not a copy."""

    stream_id: int
    data: bytes | memoryview
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The stream is gone. ``remote`` is False when we reset it because the peer misbehaved."""

    stream_id: int
    code: ErrorCode
    reason: str
    remote: bool = True


@dataclass(frozen=True, slots=True)
class WindowUpdated(Event):
    """More send credit: on one stream, or on the tunnel when ``stream_id`` is 0."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    opaque: int


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    last_stream_id: int
    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class NoticeReceived(Event):
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UnknownFrameReceived(Event):
    """A frame type this version does not know; skipped, reported for the log."""

    frame_type: int
    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(Event):
    """The tunnel is unusable. The adapter flushes ``data_to_send`` and closes with
    ``CLOSE_CODE_BASE + code``."""

    code: ErrorCode
    reason: str
