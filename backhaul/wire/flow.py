"""Credit-based flow control, per stream and per tunnel.

Modelled on HTTP/2 (RFC 9113 §5.2, §6.9) and h2's ``WindowManager``: a sender never sends more
DATA than the receiver has granted; the receiver grants more only when its application has
*consumed* data, not when it arrived. A slow consumer therefore stops the producer at the
other end of the tunnel instead of filling memory on the way.
"""

from __future__ import annotations

from backhaul.wire.errors import ErrorCode, RemoteProtocolError
from backhaul.wire.frames import MAX_WINDOW

#: While newer streams share the tunnel, an older stream keeps at most this many of its bytes
#: in flight (sent and not yet credited), whatever window the peer granted. The bytes in
#: flight wait in the socket buffers ahead of everything sent after them, first in, first
#: out: a bulk transfer with its whole window in flight makes every small answer queue behind
#: 2 MiB. Only a peer that announces ``window_update`` gets this (it returns credit early
#: enough; one that returns it at half the window would stall a stream held below that).
YIELD_IN_FLIGHT = 512 * 1024
#: The same toward a peer that announces ``prompt_credit``: each DATA frame of a yielding
#: stream asks for its credit back as soon as it is consumed, so a stream kept this low does
#: not stall, and its frames are at most PROMPT_FRAME bytes. A small answer then waits behind
#: a quarter as much, and the receiver's event loop takes the transfer in smaller bites.
PROMPT_IN_FLIGHT = 128 * 1024
PROMPT_FRAME = 32 * 1024
#: How long, in DATA bytes sent on the tunnel since a stream last started, older streams
#: hold back: a transfer with one small request beside it yields for this much, not for the
#: rest of its life.
YIELD_SPAN = 8 * 1024 * 1024


class SendWindow:
    """How many more bytes we may send, as granted by the peer."""

    __slots__ = ("available", "credited")

    def __init__(self, initial: int) -> None:
        self.available = initial
        #: Credit granted since the start: the peer has consumed at least this many bytes.
        self.credited = 0

    def consume(self, size: int) -> None:
        self.available -= size

    def grant(self, increment: int, stream_id: int) -> None:
        if self.available + increment > MAX_WINDOW:
            raise RemoteProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR, "WINDOW increment overflows the window", stream_id
            )
        self.available += increment
        self.credited += increment


class ReceiveWindow:
    """The credit we granted the peer, and when to grant more.

    ``received`` checks the peer stayed inside the window; ``consumed`` records what the
    application has processed and returns the increment to send, batched until ``threshold``
    bytes are free (half the window by default, as h2 does) so that WINDOW frames stay rare,
    or at once while bytes up to the end of a frame that asked for prompt credit are
    consumed and not yet returned (:meth:`prompt`).
    """

    __slots__ = ("_consumed", "_pending", "_prompt_upto", "_received", "_threshold", "available")

    def __init__(self, size: int, threshold: int | None = None) -> None:
        self._threshold = size // 2 if threshold is None else threshold
        self.available = size
        self._pending = 0
        self._received = 0
        self._consumed = 0
        #: Bytes received up to the end of the last frame that asked for prompt credit.
        self._prompt_upto = 0

    def received(self, size: int, stream_id: int) -> None:
        if size > self.available:
            raise RemoteProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"peer sent {size} bytes with only {self.available} of credit",
                stream_id,
            )
        self.available -= size
        self._received += size

    def prompt(self) -> None:
        """The frame just received asked for its credit back as soon as it is consumed."""
        self._prompt_upto = self._received

    def consumed(self, size: int) -> int:
        self._pending += size
        self._consumed += size
        if (
            self._pending >= self._threshold
            or self.available == 0
            or self._consumed - self._pending < self._prompt_upto
        ):
            increment, self._pending = self._pending, 0
            self.available += increment
            return increment
        return 0
