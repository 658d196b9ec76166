"""Error codes and exceptions of the tunnel protocol.

The codes travel in RESET and GOAWAY frames and, offset by 4000, as WebSocket close codes
(RFC 6455 §7.4.2 reserves 4000-4999 for applications).

::

    ProtocolError                     (backhaul.errors.BackhaulError)
    ├── LocalProtocolError            this side tried to break the rules (a bug, or a caller
    │   │                             asking for something the state forbids)
    │   ├── FlowControlBlocked        more DATA than the peer's window allows
    │   └── StreamUnavailable         the stream is closed, unknown, or the tunnel is going away
    └── RemoteProtocolError           the peer broke the rules; carries the code to send back
"""

from __future__ import annotations

from enum import IntEnum

from backhaul.errors import BackhaulError


class ErrorCode(IntEnum):
    """Why a stream was reset or a tunnel closed (modelled on RFC 9113 §7)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    FRAME_TOO_LARGE = 5
    REFUSED_STREAM = 6
    CANCEL = 7
    TARGET_DENIED = 8
    UPSTREAM_UNREACHABLE = 9
    DEADLINE_EXCEEDED = 10
    CREDENTIALS_INVALID = 11
    UPSTREAM_ERROR = 12
    HEADERS_TOO_LARGE = 13
    UNAUTHORIZED = 14
    UNSUPPORTED_VERSION = 15
    ENHANCE_YOUR_CALM = 16
    BAD_REQUEST = 17
    #: The internal API refused the connection's Windows credentials, or the handshake failed.
    UPSTREAM_AUTH_FAILED = 18
    #: An additional tunnel landed on a relay worker that already holds one of the member's
    #: tunnels (handshake close 4019); the agent tries again, to reach another worker.
    ALREADY_CONNECTED = 19

    @classmethod
    def parse(cls, value: int) -> ErrorCode:
        """Map an unknown code from the wire to INTERNAL_ERROR rather than failing."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


#: WebSocket close code for a tunnel-level error: 4000 + ErrorCode.
CLOSE_CODE_BASE = 4000


class ProtocolError(BackhaulError):
    """Root of the tunnel protocol's errors."""


class LocalProtocolError(ProtocolError):
    """This side asked for something the protocol state forbids."""


class FlowControlBlocked(LocalProtocolError):
    """Sending would exceed the peer's flow-control window."""


class StreamUnavailable(LocalProtocolError):
    """The stream is closed or unknown, or the tunnel no longer takes new streams."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol. ``code`` is what to send back; ``stream_id`` is 0 when
    the whole tunnel is at fault."""

    def __init__(self, code: ErrorCode, reason: str, stream_id: int = 0) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.stream_id = stream_id
