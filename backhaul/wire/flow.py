"""Credit-based flow control, per stream and per tunnel.

Modelled on HTTP/2 (RFC 9113 §5.2, §6.9) and h2's ``WindowManager``: a sender never sends more
DATA than the receiver has granted; the receiver grants more only when its application has
*consumed* data, not when it arrived. A slow consumer therefore stops the producer at the
other end of the tunnel instead of filling memory on the way.
"""

from __future__ import annotations

from backhaul.wire.errors import ErrorCode, RemoteProtocolError
from backhaul.wire.frames import MAX_WINDOW


class SendWindow:
    """How many more bytes we may send, as granted by the peer."""

    __slots__ = ("available",)

    def __init__(self, initial: int) -> None:
        self.available = initial

    def consume(self, size: int) -> None:
        self.available -= size

    def grant(self, increment: int, stream_id: int) -> None:
        if self.available + increment > MAX_WINDOW:
            raise RemoteProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR, "WINDOW increment overflows the window", stream_id
            )
        self.available += increment


class ReceiveWindow:
    """The credit we granted the peer, and when to grant more.

    ``received`` checks the peer stayed inside the window; ``consumed`` records what the
    application has processed and returns the increment to send, batched until at least half
    the window is free so that WINDOW frames stay rare (h2 uses the same threshold).
    """

    __slots__ = ("_max", "_pending", "available")

    def __init__(self, size: int) -> None:
        self._max = size
        self.available = size
        self._pending = 0

    def received(self, size: int, stream_id: int) -> None:
        if size > self.available:
            raise RemoteProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"peer sent {size} bytes with only {self.available} of credit",
                stream_id,
            )
        self.available -= size

    def consumed(self, size: int) -> int:
        self._pending += size
        if self._pending >= self._max // 2 or self.available == 0:
            increment, self._pending = self._pending, 0
            self.available += increment
            return increment
        return 0
