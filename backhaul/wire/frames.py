"""Frame encoding and decoding: one frame per WebSocket binary message.

Layout (network byte order)::

    +--------+--------+--------------------------------+-------------------+
    | type:8 | flags:8| stream id:32                   | payload ...       |
    +--------+--------+--------------------------------+-------------------+

The WebSocket message carries the length (RFC 6455 §5.2), so the header does not. Control
payloads (HELLO, WELCOME, OPEN, RESPONSE, NOTICE) are UTF-8 JSON objects; fixed-size payloads
(WINDOW, PING, PONG, RESET, GOAWAY) are packed integers. DATA payloads are raw bytes and are
never copied more than once on the way out: a bulk one is not copied at all, but kept
beside its header as a :class:`BulkMessage`.

Decoding is total: any byte string either yields a :class:`Frame` or raises
:class:`RemoteProtocolError` with a code — nothing else escapes, and nothing is allocated
beyond the input's own size, which the caller bounds with ``max_message``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

from backhaul import compact_json
from backhaul.wire.errors import ErrorCode, RemoteProtocolError

HEADER = struct.Struct("!BBI")
HEADER_SIZE = HEADER.size
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_RESET = struct.Struct("!H")
_GOAWAY = struct.Struct("!IH")

MAX_STREAM_ID = 2**31 - 1
MAX_WINDOW = 2**31 - 1
#: Largest control payload (JSON) a peer may send; OPEN heads are bounded by this.
MAX_CONTROL_PAYLOAD = 256 * 1024
#: Largest reason string carried in RESET and GOAWAY.
MAX_REASON = 1024


class FrameType(IntEnum):
    HELLO = 0x1
    WELCOME = 0x2
    OPEN = 0x3
    RESPONSE = 0x4
    DATA = 0x5
    END = 0x6
    RESET = 0x7
    WINDOW = 0x8
    PING = 0x9
    PONG = 0xA
    GOAWAY = 0xB
    NOTICE = 0xC
    #: Several frames in one message, for a peer whose settings take them (``batch_frames``).
    BATCH = 0xD


class Flags(IntFlag):
    NONE = 0
    #: On OPEN, RESPONSE and DATA: the sender's side of the stream ends with this frame.
    END_STREAM = 0x1
    #: On DATA, to a peer that announced ``prompt_credit``: return this frame's credit as soon
    #: as it is consumed, not once ``window_update`` bytes have added up (a yielding sender).
    PROMPT_CREDIT = 0x2


#: Frame types that belong to the tunnel (stream id must be 0).
TUNNEL_FRAMES = frozenset(
    {
        FrameType.HELLO,
        FrameType.WELCOME,
        FrameType.PING,
        FrameType.PONG,
        FrameType.GOAWAY,
        FrameType.NOTICE,
        FrameType.BATCH,
    }
)
#: Frame types whose payload is a JSON object.
JSON_FRAMES = frozenset(
    {FrameType.HELLO, FrameType.WELCOME, FrameType.OPEN, FrameType.RESPONSE, FrameType.NOTICE}
)


#: END_STREAM as a plain int for the per-frame checks: ``int & IntFlag`` builds a flag object.
END_STREAM_BIT = int(Flags.END_STREAM)
PROMPT_CREDIT_BIT = int(Flags.PROMPT_CREDIT)


@dataclass(frozen=True, slots=True, init=False)
class Frame:
    """A decoded frame. ``type`` is an int so that unknown types can be reported and skipped."""

    type: int
    flags: int
    stream_id: int
    #: A bulk DATA frame's payload is a view of its message (:data:`VIEW_DATA_FROM`).
    payload: bytes | memoryview

    def __init__(self, type: int, flags: int, stream_id: int, payload: bytes | memoryview) -> None:
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "stream_id", stream_id)
        object.__setattr__(self, "payload", payload)

    @property
    def end_stream(self) -> bool:
        return bool(self.flags & END_STREAM_BIT)


def encode(
    ftype: FrameType, stream_id: int, payload: bytes | memoryview = b"", flags: int = 0
) -> bytes:
    return HEADER.pack(ftype, flags, stream_id) + payload


#: DATA payloads from this size on are not copied behind their header (:class:`BulkMessage`).
#: Above BATCH_MAX_ENTRY, so a bulk message is never one that a BATCH could take.
BULK_FROM = 16 * 1024 + 1


class BulkMessage:
    """A bulk DATA message as its frame header and its payload, not joined: a transport
    that writes buffers in order writes both, and the payload (up to the window, often
    256 KiB) is not copied into a new message on its way out. :meth:`join` is the message
    as one ``bytes``, for a transport that takes nothing else."""

    __slots__ = ("head", "payload")

    def __init__(self, head: bytes, payload: bytes | memoryview) -> None:
        self.head = head
        self.payload = payload

    def __len__(self) -> int:
        return len(self.head) + len(self.payload)

    def join(self) -> bytes:
        return self.head + self.payload


#: What the connection queues to send: a message, or a bulk DATA message in two parts.
Message = bytes | BulkMessage


def encode_data(stream_id: int, payload: bytes | memoryview, flags: int) -> Message:
    """A DATA frame; a bulk payload of immutable bytes stays where it is (BulkMessage)."""
    head = HEADER.pack(_DATA, flags, stream_id)
    if len(payload) >= BULK_FROM and (
        type(payload) is bytes or (isinstance(payload, memoryview) and type(payload.obj) is bytes)
    ):
        return BulkMessage(head, payload)
    return head + payload


def encode_json(ftype: FrameType, stream_id: int, obj: dict[str, Any], flags: int = 0) -> bytes:
    return encode(ftype, stream_id, compact_json.dumps(obj).encode(), flags)


def encode_window(stream_id: int, increment: int) -> bytes:
    return encode(FrameType.WINDOW, stream_id, _U32.pack(increment))


def encode_ping(ftype: FrameType, opaque: int) -> bytes:
    return encode(ftype, 0, _U64.pack(opaque))


def encode_reset(stream_id: int, code: ErrorCode, reason: str) -> bytes:
    return encode(FrameType.RESET, stream_id, _RESET.pack(code) + _reason_bytes(reason))


def encode_goaway(last_stream_id: int, code: ErrorCode, reason: str) -> bytes:
    return encode(FrameType.GOAWAY, 0, _GOAWAY.pack(last_stream_id, code) + _reason_bytes(reason))


_BATCH_HEADER = HEADER.pack(FrameType.BATCH, 0, 0)
_BATCH_ENTRY = struct.Struct("!I")
#: Frames larger than this go in a message of their own: batching is for the small frames of
#: many concurrent requests, and copying a bulk DATA frame into a batch buys nothing.
BATCH_MAX_ENTRY = 16 * 1024


def encode_batch(messages: list[bytes]) -> bytes:
    """One BATCH frame carrying ``messages`` (encoded frames), each behind its 4-byte length."""
    parts = [_BATCH_HEADER]
    pack = _BATCH_ENTRY.pack
    for message in messages:
        parts.append(pack(len(message)))
        parts.append(message)
    return b"".join(parts)


def decode_batch(frame: Frame, max_frames: int) -> list[bytes]:
    """The encoded frames inside a BATCH; a truncated entry or too many of them is the
    peer's protocol error (the whole tunnel: the stream ids inside can't be trusted)."""
    payload = frame.payload
    end = len(payload)
    entries: list[bytes] = []
    offset = 0
    unpack = _BATCH_ENTRY.unpack_from
    while offset < end:
        if offset + 4 > end:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "BATCH entry length truncated")
        (size,) = unpack(payload, offset)
        offset += 4
        if size > end - offset:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "BATCH entry truncated")
        if len(entries) >= max_frames:
            raise RemoteProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"BATCH carries more than {max_frames} frames"
            )
        entries.append(bytes(payload[offset : offset + size]))
        offset += size
    if not entries:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "empty BATCH")
    return entries


def _reason_bytes(reason: str) -> bytes:
    return reason.encode("utf-8", "replace")[:MAX_REASON]


#: DATA messages this large hand their payload on as a view instead of a copy.
VIEW_DATA_FROM = 16 * 1024
_DATA = FrameType.DATA.value


def decode(message: bytes, max_message: int) -> Frame:
    """Decode one WebSocket message into a frame (header checks only)."""
    if len(message) > max_message:
        raise RemoteProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"frame of {len(message)} bytes exceeds {max_message}"
        )
    if len(message) < HEADER_SIZE:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "frame shorter than its header")
    ftype, flags, stream_id = HEADER.unpack_from(message)
    if stream_id > MAX_STREAM_ID:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "stream id out of range")
    if ftype == _DATA and len(message) >= VIEW_DATA_FROM:
        return Frame(ftype, flags, stream_id, memoryview(message)[HEADER_SIZE:])
    return Frame(ftype, flags, stream_id, message[HEADER_SIZE:])


def decode_json(frame: Frame) -> dict[str, Any]:
    if len(frame.payload) > MAX_CONTROL_PAYLOAD:
        raise RemoteProtocolError(
            ErrorCode.HEADERS_TOO_LARGE, "control payload too large", frame.stream_id
        )
    try:
        obj = compact_json.loads(frame.payload)  # bytes already: no copy
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(
            ErrorCode.PROTOCOL_ERROR, f"{_name(frame.type)} payload is not JSON", frame.stream_id
        ) from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError(
            ErrorCode.PROTOCOL_ERROR,
            f"{_name(frame.type)} payload is not an object",
            frame.stream_id,
        )
    return obj


def decode_window(frame: Frame) -> int:
    if len(frame.payload) != _U32.size:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW payload must be 4 bytes")
    (increment,) = _U32.unpack(frame.payload)
    if increment == 0 or increment > MAX_WINDOW:
        raise RemoteProtocolError(
            ErrorCode.PROTOCOL_ERROR, "WINDOW increment out of range", frame.stream_id
        )
    return int(increment)


def decode_ping(frame: Frame) -> int:
    if len(frame.payload) != _U64.size:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "PING/PONG payload must be 8 bytes")
    return int(_U64.unpack(frame.payload)[0])


def decode_reset(frame: Frame) -> tuple[ErrorCode, str]:
    if len(frame.payload) < _RESET.size or len(frame.payload) > _RESET.size + MAX_REASON:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "malformed RESET payload")
    (code,) = _RESET.unpack_from(frame.payload)
    return ErrorCode.parse(code), bytes(frame.payload[_RESET.size :]).decode("utf-8", "replace")


def decode_goaway(frame: Frame) -> tuple[int, ErrorCode, str]:
    if len(frame.payload) < _GOAWAY.size or len(frame.payload) > _GOAWAY.size + MAX_REASON:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "malformed GOAWAY payload")
    last, code = _GOAWAY.unpack_from(frame.payload)
    if last > MAX_STREAM_ID:
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY stream id out of range")
    return (
        int(last),
        ErrorCode.parse(code),
        bytes(frame.payload[_GOAWAY.size :]).decode("utf-8", "replace"),
    )


def _name(ftype: int) -> str:
    try:
        return FrameType(ftype).name
    except ValueError:
        return f"frame type {ftype:#x}"
