"""A binary WebSocket message as the bytes that carry it (RFC 6455 §5.2), for the tunnel's
hot path on both ends: framed without building a frame object, and a bulk payload left
where it is instead of copied behind its header.
"""

from __future__ import annotations

import os
import struct
from collections import deque

from backhaul.wire.frames import BulkMessage

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
#: Mask keys drawn from the system's CSPRNG at a time: one system call per this many frames.
KEYS_PER_DRAW = 1024
_keys: deque[bytes] = deque()
# A forked child must not send the keys its parent will send too.
os.register_at_fork(after_in_child=_keys.clear)


def mask_key() -> bytes:
    """A fresh, unpredictable 4-byte masking key (§5.3, §10.3) from the system's CSPRNG.

    Keys are drawn ahead in blocks, so a frame does not cost a ``getrandom`` system call
    (and ``secrets``' Python layers) of its own; each key is used once. ``deque.popleft``
    is atomic, so threads sharing the pool never get the same key.
    """
    try:
        return _keys.popleft()
    except IndexError:
        block = os.urandom(4 * KEYS_PER_DRAW)
        _keys.extend([block[i : i + 4] for i in range(0, len(block), 4)])
        return _keys.popleft()


def binary_frame(
    data: bytes | BulkMessage, masked: bool
) -> tuple[bytes, ...] | tuple[bytes, bytes | memoryview]:
    """One final binary frame carrying ``data``, as one or two buffers to write in order.

    ``masked`` for a client's frame, with a fresh key from :func:`mask_key` (§5.3). A
    :class:`BulkMessage` is framed in place: its payload is the second buffer, not copied
    behind its header (masked, it is copied once anyway, by the mask).
    """
    if isinstance(data, BulkMessage):
        return _bulk_frame(data, masked)
    size = len(data)
    bit = _MASKED if masked else 0
    if size < 126:
        head = _SHORT.pack(_FIN_BINARY, bit | size)
    elif size < 65536:
        head = _MEDIUM.pack(_FIN_BINARY, bit | 126, size)
    else:
        head = _LONG.pack(_FIN_BINARY, bit | 127, size)
    if masked:
        key = mask_key()
        head += key
        data = apply_mask(data, key)
    if size < JOIN_BELOW:
        return (head + data,)
    return head, data


def _bulk_frame(message: BulkMessage, masked: bool) -> tuple[bytes, bytes | memoryview]:
    """:func:`binary_frame` of a message in two parts: the WebSocket header with the frame
    header, then the payload. Masked, each part takes the key where the message's bytes
    before it leave off: byte ``i`` of the message is masked with byte ``i % 4`` of the key
    (§5.3), so the payload's key is rotated by the frame header's length."""
    inner, payload = message.head, message.payload
    size = len(inner) + len(payload)
    if size < 65536:
        head = _MEDIUM.pack(_FIN_BINARY, (_MASKED if masked else 0) | 126, size)
    else:
        head = _LONG.pack(_FIN_BINARY, (_MASKED if masked else 0) | 127, size)
    if not masked:
        return head + inner, payload
    key = mask_key()
    shift = len(inner) % 4
    return head + key + apply_mask(inner, key), apply_mask(payload, key[shift:] + key[:shift])
