"""The tunnel's binary messages cut out of the received bytes by the connection itself.

``websockets`` parses frames with a generator per frame, an interpreted layer per read and
per field, and a ``Frame`` object and an enum lookup per message: about 8 % of the relay's
CPU at one client, and 4 to 6 µs of the agent's per message. Every tunnel message is one whole
binary frame, so both ends hand those to the tunnel from here and leave everything else to
websockets.

A :class:`FrameSplitter` takes over a connection's received bytes at a frame boundary (after
the opening handshake, which each end finds in its own way). A whole binary frame with no
RSV bit, masked as this end expects and within the size limit is unmasked here and offered
to ``message``. Every other frame (ping, pong, close, text, a fragment, a wrongly masked
one, a message ``message`` declines) goes whole to ``frame``, which feeds it to websockets:
its parser has only ever seen whole frames, so it applies all its checks as before. Once
``frame`` reports the connection no longer open (a close, a protocol error), or a frame's
header announces more than the limit, the splitter hands everything that follows to
``frame`` and sets :attr:`done`: from then on its owner feeds websockets directly.
"""

from __future__ import annotations

from collections.abc import Callable

try:
    from websockets.speedups import apply_mask
except ImportError:  # a build of websockets without its C extension
    from websockets.utils import apply_mask

#: The first byte of a whole binary message: FIN, no RSV bits, opcode 2.
_BINARY_FIN = 0x82


class FrameSplitter:
    """A connection's received frames, from a frame boundary on; see the module docstring."""

    def __init__(
        self,
        masked: bool,
        limit: int | None,
        message: Callable[[bytes], bool],
        frame: Callable[[bytes], bool],
    ) -> None:
        """``masked``: the peer is a client, whose frames carry a mask (RFC 6455 §5.3).
        ``limit``: the largest payload websockets would take in one frame (None: any).
        ``message`` takes a whole binary message's payload, or declines it (False).
        ``frame`` feeds a frame's bytes to websockets and says whether the connection is
        still open; it also receives everything after the splitter is done."""
        self._mask_bit = 0x80 if masked else 0
        self._limit = limit
        self._message = message
        self._frame = frame
        #: websockets parses everything from now on.
        self.done = False
        #: The received pieces of a frame not yet whole, kept as they came and joined once,
        #: when the frame is: a 256 KiB message arrives in many reads, and joining at every
        #: read would copy it again and again.
        self.pending: list[bytes | memoryview] = []
        self.pending_size = 0
        #: The size of the frame the pieces start, once its header is in (0: not yet).
        self._need = 0

    def feed(self, data: bytes) -> None:
        """Received bytes, in order (not once :attr:`done`)."""
        pending = self.pending
        if pending:
            pending.append(data)
            self.pending_size += len(data)
            if self.pending_size < self._need:
                return
            self.pending = []
            self.pending_size = 0
            if self._need and not self._mask_bit:
                rest = self._whole_message(pending, self._need)
                if rest is not None:
                    if len(rest):
                        self._split(rest)
                    return
            data = b"".join(pending)
        self._split(data)

    def _whole_message(
        self, pieces: list[bytes | memoryview], size: int
    ) -> bytes | memoryview | None:
        """An unmasked frame of ``size`` bytes that ``pieces`` complete, the first piece
        starting it: if it is a whole binary message that ``message`` takes, its payload is
        cut out of the pieces in one copy, where joining them and slicing the payload out
        of the result made two (256 KiB each, per DATA message of an upload, in the agent).
        Returns what follows the frame, or None for a frame (or a declined message) that
        goes the way of every other, with nothing consumed."""
        first = pieces[0]
        second = first[1]
        if first[0] != _BINARY_FIN or second & 0x80:
            return None
        length = second & 0x7F
        head = 2 if length < 126 else 4 if length == 126 else 10
        parts: list[bytes | memoryview] = [memoryview(first)[head:]]
        taken = len(first)
        rest: bytes | memoryview = b""
        for piece in pieces[1:]:
            if taken + len(piece) >= size:
                cut = size - taken
                parts.append(memoryview(piece)[:cut])
                rest = memoryview(piece)[cut:]
                break
            parts.append(piece)
            taken += len(piece)
        if not self._message(b"".join(parts)):
            return None
        return rest

    def _split(self, buffer: bytes | memoryview) -> None:
        size = len(buffer)
        pos = 0
        need = 0
        limit = self._limit
        mask_bit = self._mask_bit
        while size - pos >= 2:
            second = buffer[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                head = 10
            masked = second & 0x80
            if masked:
                head += 4
            if limit is not None and length > limit:
                # websockets refuses this one from its header (1009): give it the rest.
                self._hand_over(bytes(buffer[pos:]))
                return
            end = pos + head + length
            if end > size:
                need = end - pos
                break
            if buffer[pos] == _BINARY_FIN and masked == mask_bit:
                if masked:
                    # Unmasked from a view: slicing the bytes first copied the payload once
                    # more, 256 KiB per DATA message of a download in the relay
                    # (bench/PROFILE.md, "The masked payload").
                    view = memoryview(buffer)
                    payload = apply_mask(
                        view[pos + head : end], bytes(buffer[pos + head - 4 : pos + head])
                    )
                else:
                    payload = bytes(buffer[pos + head : end])
                if self._message(payload):
                    pos = end
                    continue
            start = pos
            pos = end
            if not self._frame(bytes(buffer[start:end])):
                self._hand_over(bytes(buffer[pos:]))
                return
        if pos < size:
            self.pending = [memoryview(buffer)[pos:] if pos else buffer]
            self.pending_size = size - pos
            self._need = need

    def _hand_over(self, rest: bytes) -> None:
        """websockets parses everything from now on, starting with ``rest``."""
        self.done = True
        if rest:
            self._frame(rest)


def limit_of(max_message_size: int | None, max_fragment_size: int | None) -> int | None:
    """The largest single-frame message websockets takes with these limits (None: any)."""
    if max_message_size is None:
        return max_fragment_size
    if max_fragment_size is None:
        return max_message_size
    return min(max_message_size, max_fragment_size)
