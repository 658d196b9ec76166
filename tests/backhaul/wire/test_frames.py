"""Byte-level tests of the frame codec."""

from __future__ import annotations

import json

import pytest

from backhaul.wire import frames as f
from backhaul.wire.errors import ErrorCode, RemoteProtocolError

MAX = 1 << 20


def _raises(code: ErrorCode, func, *args) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        func(*args)
    assert info.value.code is code, info.value.reason
    return info.value


# ---------------------------------------------------------------- exact encodings


def test_header_layout() -> None:
    assert f.HEADER_SIZE == 6
    assert f.encode(f.FrameType.END, 9) == b"\x06\x00\x00\x00\x00\x09"


def test_data_frame_bytes() -> None:
    message = f.encode(f.FrameType.DATA, 0x01020304, b"hi", f.Flags.END_STREAM)
    assert message == b"\x05\x01\x01\x02\x03\x04hi"


def test_data_frame_accepts_memoryview() -> None:
    body = memoryview(b"abcdef")[2:5]
    assert f.encode(f.FrameType.DATA, 1, body) == b"\x05\x00\x00\x00\x00\x01cde"


def test_json_frame_bytes_are_compact() -> None:
    message = f.encode_json(f.FrameType.OPEN, 1, {"method": "GET", "path": "/"}, 1)
    assert message == b'\x03\x01\x00\x00\x00\x01{"method":"GET","path":"/"}'


def test_json_frame_non_ascii_is_escaped_utf8() -> None:
    message = f.encode_json(f.FrameType.NOTICE, 0, {"msg": "h\u00e9"})
    assert message == b'\x0c\x00\x00\x00\x00\x00{"msg":"h\\u00e9"}'


def test_window_frame_bytes() -> None:
    assert f.encode_window(3, 65536) == b"\x08\x00\x00\x00\x00\x03\x00\x01\x00\x00"


def test_ping_and_pong_bytes() -> None:
    opaque = 0x0102030405060708
    assert f.encode_ping(f.FrameType.PING, opaque) == b"\x09\x00\x00\x00\x00\x00" + bytes(
        range(1, 9)
    )
    assert f.encode_ping(f.FrameType.PONG, 0) == b"\x0a\x00\x00\x00\x00\x00" + bytes(8)


def test_reset_frame_bytes() -> None:
    assert f.encode_reset(5, ErrorCode.CANCEL, "bye") == b"\x07\x00\x00\x00\x00\x05\x00\x07bye"


def test_goaway_frame_bytes() -> None:
    message = f.encode_goaway(7, ErrorCode.ENHANCE_YOUR_CALM, "x")
    assert message == b"\x0b\x00\x00\x00\x00\x00\x00\x00\x00\x07\x00\x10x"


def test_reason_is_truncated_to_max_reason_bytes() -> None:
    message = f.encode_reset(1, ErrorCode.CANCEL, "r" * 5000)
    assert len(message) == f.HEADER_SIZE + 2 + f.MAX_REASON
    code, reason = f.decode_reset(f.decode(message, MAX))
    assert (code, reason) == (ErrorCode.CANCEL, "r" * f.MAX_REASON)


def test_unencodable_reason_is_replaced() -> None:
    message = f.encode_goaway(0, ErrorCode.NO_ERROR, "a\udcffb")
    assert message.endswith(b"a?b")


def test_reason_cut_inside_a_multibyte_char_still_decodes() -> None:
    # 1024 bytes hold 341 three-byte characters and one stray byte.
    message = f.encode_reset(1, ErrorCode.CANCEL, "\u20ac" * 600)
    code, reason = f.decode_reset(f.decode(message, MAX))
    assert code is ErrorCode.CANCEL
    assert reason == "\u20ac" * 341 + "\ufffd"


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("ftype", list(f.FrameType))
@pytest.mark.parametrize("flags", [0, 1, 0xFF])
@pytest.mark.parametrize("stream_id", [0, 1, 2**31 - 1])
def test_header_round_trip(ftype: f.FrameType, flags: int, stream_id: int) -> None:
    frame = f.decode(f.encode(ftype, stream_id, b"payload", flags), MAX)
    assert frame == f.Frame(int(ftype), flags, stream_id, b"payload")
    assert frame.end_stream is bool(flags & 1)


def test_empty_payload_round_trip() -> None:
    frame = f.decode(f.encode(f.FrameType.END, 3), MAX)
    assert (frame.type, frame.flags, frame.stream_id, frame.payload) == (f.FrameType.END, 0, 3, b"")


def test_unknown_type_decodes() -> None:
    frame = f.decode(b"\xee\x00\x00\x00\x00\x01zz", MAX)
    assert frame.type == 0xEE
    assert frame.payload == b"zz"


def test_json_round_trip() -> None:
    head = {"method": "POST", "path": "/a?b=c", "headers": [["x", "\u00e9"]], "n": None}
    frame = f.decode(f.encode_json(f.FrameType.RESPONSE, 11, head, 1), MAX)
    assert frame.end_stream
    assert f.decode_json(frame) == head


@pytest.mark.parametrize("increment", [1, 12345, f.MAX_WINDOW])
def test_window_round_trip(increment: int) -> None:
    assert f.decode_window(f.decode(f.encode_window(9, increment), MAX)) == increment


@pytest.mark.parametrize("opaque", [0, 1, 2**64 - 1])
def test_ping_round_trip(opaque: int) -> None:
    for ftype in (f.FrameType.PING, f.FrameType.PONG):
        frame = f.decode(f.encode_ping(ftype, opaque), MAX)
        assert frame.type == ftype
        assert f.decode_ping(frame) == opaque


@pytest.mark.parametrize("code", list(ErrorCode))
def test_reset_round_trip(code: ErrorCode) -> None:
    frame = f.decode(f.encode_reset(3, code, "why \u00e9"), MAX)
    assert frame.stream_id == 3
    assert f.decode_reset(frame) == (code, "why \u00e9")


def test_goaway_round_trip() -> None:
    frame = f.decode(f.encode_goaway(f.MAX_STREAM_ID, ErrorCode.NO_ERROR, "drain"), MAX)
    assert f.decode_goaway(frame) == (f.MAX_STREAM_ID, ErrorCode.NO_ERROR, "drain")


def test_unknown_error_code_maps_to_internal_error() -> None:
    frame = f.Frame(f.FrameType.RESET, 0, 1, b"\x03\xe7oops")
    assert f.decode_reset(frame) == (ErrorCode.INTERNAL_ERROR, "oops")
    frame = f.Frame(f.FrameType.GOAWAY, 0, 0, b"\x00\x00\x00\x01\xff\xff")
    assert f.decode_goaway(frame) == (1, ErrorCode.INTERNAL_ERROR, "")


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize("message", [b"", b"\x05", b"\x05\x00\x00\x00\x00"])
def test_short_header(message: bytes) -> None:
    _raises(ErrorCode.PROTOCOL_ERROR, f.decode, message, MAX)


def test_oversize_message() -> None:
    message = f.encode(f.FrameType.DATA, 1, b"x" * 100)
    assert f.decode(message, len(message)).payload == b"x" * 100
    _raises(ErrorCode.FRAME_TOO_LARGE, f.decode, message, len(message) - 1)


def test_oversize_is_checked_before_the_header() -> None:
    _raises(ErrorCode.FRAME_TOO_LARGE, f.decode, b"abc", 2)


def test_stream_id_out_of_range() -> None:
    assert f.decode(b"\x05\x00\x7f\xff\xff\xff", MAX).stream_id == 2**31 - 1
    _raises(ErrorCode.PROTOCOL_ERROR, f.decode, b"\x05\x00\x80\x00\x00\x00", MAX)
    _raises(ErrorCode.PROTOCOL_ERROR, f.decode, b"\x05\x00\xff\xff\xff\xff", MAX)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x00\x01"])
def test_window_bad_size(payload: bytes) -> None:
    _raises(ErrorCode.PROTOCOL_ERROR, f.decode_window, f.Frame(f.FrameType.WINDOW, 0, 1, payload))


def test_window_zero_increment_names_the_stream() -> None:
    frame = f.decode(b"\x08\x00\x00\x00\x00\x07\x00\x00\x00\x00", MAX)
    assert _raises(ErrorCode.PROTOCOL_ERROR, f.decode_window, frame).stream_id == 7


def test_window_increment_above_max_window() -> None:
    frame = f.Frame(f.FrameType.WINDOW, 0, 0, b"\x80\x00\x00\x00")
    _raises(ErrorCode.PROTOCOL_ERROR, f.decode_window, frame)


@pytest.mark.parametrize("size", [0, 7, 9, 16])
def test_ping_bad_length(size: int) -> None:
    for ftype in (f.FrameType.PING, f.FrameType.PONG):
        _raises(ErrorCode.PROTOCOL_ERROR, f.decode_ping, f.Frame(ftype, 0, 0, b"\x01" * size))


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00\x07" + b"r" * (f.MAX_REASON + 1)])
def test_reset_malformed(payload: bytes) -> None:
    _raises(ErrorCode.PROTOCOL_ERROR, f.decode_reset, f.Frame(f.FrameType.RESET, 0, 1, payload))


def test_reset_reason_at_the_limit_is_accepted() -> None:
    frame = f.Frame(f.FrameType.RESET, 0, 1, b"\x00\x07" + b"r" * f.MAX_REASON)
    assert f.decode_reset(frame) == (ErrorCode.CANCEL, "r" * f.MAX_REASON)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x00\x00\x01\x00",
        b"\x00\x00\x00\x01\x00\x00" + b"r" * (f.MAX_REASON + 1),
        b"\x80\x00\x00\x00\x00\x00",
    ],
)
def test_goaway_malformed(payload: bytes) -> None:
    frame = f.Frame(f.FrameType.GOAWAY, 0, 0, payload)
    _raises(ErrorCode.PROTOCOL_ERROR, f.decode_goaway, frame)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"{",
        b"\xff\xfe\x00",
        b'{"a":1} trailing',
        b'{"n":' + b"9" * 5000 + b"}",
        b"[" * 100_000,
    ],
)
def test_non_json_payload(payload: bytes) -> None:
    frame = f.Frame(f.FrameType.OPEN, 0, 5, payload)
    assert _raises(ErrorCode.PROTOCOL_ERROR, f.decode_json, frame).stream_id == 5


@pytest.mark.parametrize("payload", [b"[]", b'"text"', b"1", b"null", b"true", b"[{}]"])
def test_non_object_json_payload(payload: bytes) -> None:
    frame = f.Frame(f.FrameType.RESPONSE, 0, 3, payload)
    error = _raises(ErrorCode.PROTOCOL_ERROR, f.decode_json, frame)
    assert error.stream_id == 3
    assert "RESPONSE" in error.reason


def test_json_payload_too_large() -> None:
    body = json.dumps({"x": "y" * f.MAX_CONTROL_PAYLOAD}).encode()
    frame = f.Frame(f.FrameType.OPEN, 0, 9, body)
    assert _raises(ErrorCode.HEADERS_TOO_LARGE, f.decode_json, frame).stream_id == 9


def test_json_payload_at_the_limit_is_accepted() -> None:
    body = b'{"x":"' + b"y" * (f.MAX_CONTROL_PAYLOAD - 8) + b'"}'
    assert len(body) == f.MAX_CONTROL_PAYLOAD
    assert f.decode_json(f.Frame(f.FrameType.OPEN, 0, 1, body)) == {
        "x": "y" * (f.MAX_CONTROL_PAYLOAD - 8)
    }


def test_error_reason_names_unknown_types() -> None:
    error = _raises(ErrorCode.PROTOCOL_ERROR, f.decode_json, f.Frame(0x42, 0, 0, b"x"))
    assert "0x42" in error.reason


def test_a_bulk_data_payload_is_a_view_of_its_message_not_a_copy() -> None:
    payload = bytes(range(256)) * 256  # 64 KiB
    message = f.encode(f.FrameType.DATA, 7, payload, f.END_STREAM_BIT)
    frame = f.decode(message, 1 << 20)
    assert isinstance(frame.payload, memoryview)
    assert frame.payload.readonly
    assert frame.payload.obj is message  # the message's own bytes, no copy
    assert frame.payload == payload
    assert (frame.stream_id, frame.end_stream) == (7, True)


@pytest.mark.parametrize("size", [0, 1, f.VIEW_DATA_FROM - f.HEADER_SIZE - 1])
def test_a_small_data_payload_and_every_control_payload_are_bytes(size: int) -> None:
    small = f.decode(f.encode(f.FrameType.DATA, 1, b"x" * size), 1 << 20)
    assert type(small.payload) is bytes and small.payload == b"x" * size
    big_json = f.encode(f.FrameType.NOTICE, 0, b'{"pad":"' + b"p" * 40_000 + b'"}')
    control = f.decode(big_json, 1 << 20)
    assert type(control.payload) is bytes
