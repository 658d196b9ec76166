"""A binary WebSocket message as the bytes that carry it (RFC 6455 §5.2), for the tunnel's
hot path on both ends: framed without building a frame object, and a bulk payload left
where it is instead of copied behind its header.
"""

from __future__ import annotations

import secrets
import struct

try:
    from websockets.speedups import apply_mask
except ImportError:  # a build of websockets without its C extension
    from websockets.utils import apply_mask

_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
_FIN_BINARY = 0x82
_MASKED = 0x80
#: Payloads below this leave in one buffer with their header: one TLS record, not two.
JOIN_BELOW = 16 * 1024


def binary_frame(data: bytes, masked: bool) -> tuple[bytes, ...]:
    """One final binary frame carrying ``data``, as one or two buffers to write in order.

    ``masked`` for a client's frame, with a fresh key from the system's CSPRNG (§5.3).
    """
    size = len(data)
    bit = _MASKED if masked else 0
    if size < 126:
        head = _SHORT.pack(_FIN_BINARY, bit | size)
    elif size < 65536:
        head = _MEDIUM.pack(_FIN_BINARY, bit | 126, size)
    else:
        head = _LONG.pack(_FIN_BINARY, bit | 127, size)
    if masked:
        key = secrets.token_bytes(4)
        head += key
        data = apply_mask(data, key)
    if size < JOIN_BELOW:
        return (head + data,)
    return head, data
