"""The frame splitter: whole binary messages out, every other frame to websockets whole."""

from __future__ import annotations

import os
import random

import pytest

from backhaul.aio.wssplit import FrameSplitter, limit_of
from tests.ws_frames import frame


class Owner:
    """Records what the splitter hands where; ``open`` goes False at a close frame."""

    def __init__(self, taking: bool = True) -> None:
        self.messages: list[bytes] = []
        self.frames: list[bytes] = []
        self.taking = taking

    def message(self, payload: bytes) -> bool:
        if self.taking:
            self.messages.append(payload)
        return self.taking

    def frame(self, raw: bytes) -> bool:
        self.frames.append(raw)
        return raw[0] & 0x0F != 0x8


@pytest.mark.parametrize("masked", [False, True])
def test_in_any_chunking_messages_and_other_frames_come_out_whole_and_in_order(
    masked: bool,
) -> None:
    rng = random.Random(6455)
    blobs = [os.urandom(n) for n in (0, 1, 125, 126, 65_535, 65_536, 200_000)]
    pieces = [frame(0x2, blob, masked=masked) for blob in blobs[:4]]
    others = [
        frame(0x9, b"ping", masked=masked),
        frame(0x2, b"ab", fin=False, masked=masked),
        frame(0x0, b"cd", masked=masked),
        frame(0x1, b"text", masked=masked),
        frame(0x2, b"wrongly masked", masked=not masked),
        bytes([0xC2]) + frame(0x2, b"rsv1", masked=masked)[1:],
    ]
    stream = b"".join(pieces + others + [frame(0x2, blob, masked=masked) for blob in blobs[4:]])
    for cut in range(5):
        owner = Owner()
        splitter = FrameSplitter(masked, 2**20, owner.message, owner.frame)
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 3 if cut == 0 else 70_000)
            splitter.feed(stream[pos : pos + step])
            pos += step
        assert owner.messages == blobs
        assert owner.frames == others
        assert all(type(m) is bytes for m in owner.messages + owner.frames)
        assert splitter.pending == [] and not splitter.done


def test_a_declined_message_goes_to_websockets_whole() -> None:
    owner = Owner(taking=False)
    splitter = FrameSplitter(False, None, owner.message, owner.frame)
    raw = frame(0x2, b"declined") + frame(0x2, b"too")
    splitter.feed(raw)
    assert owner.frames == [frame(0x2, b"declined"), frame(0x2, b"too")]


def test_a_message_in_many_reads_is_cut_from_them_and_what_follows_is_split_as_usual() -> None:
    owner = Owner()
    splitter = FrameSplitter(False, None, owner.message, owner.frame)
    message = os.urandom(256 * 1024)
    raw = frame(0x2, message)
    ping, following = frame(0x9, b"ping"), frame(0x2, b"following")
    reads = [raw[i : i + 16_384] for i in range(0, len(raw), 16_384)]
    for read in reads[:-1]:
        splitter.feed(read)
    splitter.feed(reads[-1] + ping + frame(0x2, b"short") + following[:4])
    assert owner.messages == [message, b"short"]
    assert owner.frames == [ping]
    assert all(type(m) is bytes for m in owner.messages + owner.frames)
    assert splitter.pending_size == 4
    splitter.feed(following[4:])
    assert owner.messages[-1] == b"following" and splitter.pending == []


def test_a_declined_message_in_many_reads_goes_to_websockets_whole() -> None:
    owner = Owner(taking=False)
    splitter = FrameSplitter(False, None, owner.message, owner.frame)
    raw = frame(0x2, os.urandom(100_000))
    after = frame(0x2, b"after")
    splitter.feed(raw[:30_000])
    splitter.feed(raw[30_000:] + after)
    assert owner.frames == [raw, after]
    assert all(type(f) is bytes for f in owner.frames)


def test_after_a_close_everything_goes_to_websockets_as_it_comes() -> None:
    owner = Owner()
    splitter = FrameSplitter(False, None, owner.message, owner.frame)
    close = frame(0x8, (1000).to_bytes(2, "big"))
    after = frame(0x2, b"after the close")
    splitter.feed(frame(0x2, b"before") + close + after[:5])
    assert splitter.done
    assert owner.messages == [b"before"]
    assert owner.frames == [close, after[:5]]


def test_a_frame_over_the_limit_is_handed_over_from_its_header() -> None:
    owner = Owner()
    splitter = FrameSplitter(False, 1000, owner.message, owner.frame)
    big = frame(0x2, b"x" * 1001)
    splitter.feed(frame(0x2, b"fits") + big[:4])  # header only: no need to wait for it
    assert splitter.done
    assert owner.messages == [b"fits"] and owner.frames == [big[:4]]


def test_a_large_frame_in_many_reads_is_joined_once_when_whole() -> None:
    owner = Owner()
    splitter = FrameSplitter(True, None, owner.message, owner.frame)
    message = os.urandom(256 * 1024)
    raw = frame(0x2, message, masked=True)
    reads = [raw[i : i + 16_384] for i in range(0, len(raw), 16_384)]
    for count, read in enumerate(reads[:-1], 1):
        splitter.feed(read)
        assert len(splitter.pending) == count  # kept as received, not joined
    splitter.feed(reads[-1] + frame(0x2, b"next", masked=True)[:3])
    assert owner.messages == [message]
    assert splitter.pending_size == 3


def test_the_limit_is_the_smaller_of_websockets_two() -> None:
    assert limit_of(None, None) is None
    assert limit_of(100, None) == 100
    assert limit_of(None, 50) == 50
    assert limit_of(100, 50) == 50


def test_a_masked_message_is_unmasked_by_websockets_own_python_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without websockets' C extension, its Python ``apply_mask`` takes the payload's view."""
    from websockets.utils import apply_mask

    from backhaul.aio import wssplit

    monkeypatch.setattr(wssplit, "apply_mask", apply_mask)
    blobs = [b"", b"abc", os.urandom(70_000)]
    owner = Owner()
    splitter = FrameSplitter(True, 2**20, owner.message, owner.frame)
    splitter.feed(b"".join(frame(0x2, blob, masked=True) for blob in blobs))
    assert owner.messages == blobs
    assert all(type(message) is bytes for message in owner.messages)
