"""Stream states and every transition between them, in one table.

A stream is half-closed from one side when that side has sent its last body byte (END, or
END_STREAM on OPEN/RESPONSE/DATA), as in RFC 9113 §5.1. A reset removes the stream at once.
"""

from __future__ import annotations

from enum import Enum

from backhaul.wire.flow import ReceiveWindow, SendWindow


class StreamState(Enum):
    # Members are singletons compared by identity, so identity hashing agrees with equality;
    # Enum's own __hash__ is a Python method, and every transition hashes two members.
    __hash__ = object.__hash__

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class StreamInput(Enum):
    __hash__ = object.__hash__

    SEND_END = "send end"
    RECV_END = "receive end"


TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (StreamState.OPEN, StreamInput.SEND_END): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, StreamInput.RECV_END): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_LOCAL, StreamInput.RECV_END): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, StreamInput.SEND_END): StreamState.CLOSED,
}


class Stream:
    """Per-stream bookkeeping: state, both windows, and whether a head has arrived."""

    __slots__ = ("head_received", "id", "order", "prompt_end", "recv", "send", "sent", "state")

    def __init__(
        self,
        stream_id: int,
        send_window: int,
        recv_window: int,
        recv_threshold: int | None = None,
        order: int = 0,
    ) -> None:
        self.id = stream_id
        self.state = StreamState.OPEN
        self.send = SendWindow(send_window)
        self.recv = ReceiveWindow(recv_window, recv_threshold)
        self.head_received = False
        #: Which stream of the tunnel this is, counting from 1 in the order they started.
        self.order = order
        #: DATA bytes sent, and ``sent`` after the last frame that asked for prompt credit.
        self.sent = 0
        self.prompt_end = 0

    def transition(self, event: StreamInput) -> StreamState | None:
        """Apply ``event``; None when the table has no such transition (a rules violation)."""
        new = TRANSITIONS.get((self.state, event))
        if new is not None:
            self.state = new
        return new

    @property
    def can_send(self) -> bool:
        return self.state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)

    @property
    def can_receive(self) -> bool:
        return self.state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
