"""The tunnel protocol, sans I/O: frames, streams, flow control and the connection state.

Nothing here imports asyncio or opens a socket; ``backhaul.aio`` adapts it to asyncio.
"""

from backhaul.wire.connection import Connection, Phase, Role
from backhaul.wire.errors import (
    CLOSE_CODE_BASE,
    ErrorCode,
    FlowControlBlocked,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamUnavailable,
)
from backhaul.wire.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    NoticeReceived,
    PingReceived,
    PongReceived,
    ResponseReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    UnknownFrameReceived,
    WelcomeReceived,
    WindowUpdated,
)
from backhaul.wire.settings import Settings

__all__ = [
    "CLOSE_CODE_BASE",
    "Connection",
    "ConnectionTerminated",
    "DataReceived",
    "ErrorCode",
    "Event",
    "FlowControlBlocked",
    "GoAwayReceived",
    "HelloReceived",
    "LocalProtocolError",
    "NoticeReceived",
    "Phase",
    "PingReceived",
    "PongReceived",
    "ProtocolError",
    "RemoteProtocolError",
    "ResponseReceived",
    "Role",
    "Settings",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "StreamUnavailable",
    "UnknownFrameReceived",
    "WelcomeReceived",
    "WindowUpdated",
]
