"""WebSocket frames as RFC 6455 §5.2 lays them out, for the tests of both ends' parsers."""

from __future__ import annotations

import os

from websockets.utils import apply_mask


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = False) -> bytes:
    """One frame; ``masked`` as a client's, with a fresh key."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        head.append(bit | size)
    elif size < 65_536:
        head += bytes([bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + apply_mask(payload, key)
