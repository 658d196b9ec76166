"""The caller transport sends one iteration's small writes together, in order, and never
holds back a large write or the end of the connection."""

from __future__ import annotations

import asyncio
from typing import Any

from relay.coalesce import DIRECT_WRITE, JOIN_BELOW, CoalescingTransport


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, chunks: list[bytes]) -> None:
        self.calls.append(("writelines", [bytes(c) for c in chunks]))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def _wrap() -> tuple[CoalescingTransport, _Recorder]:
    recorder = _Recorder()
    return CoalescingTransport(recorder, asyncio.get_running_loop()), recorder  # type: ignore[arg-type]


async def test_a_head_and_a_body_leave_in_one_write_at_the_end_of_the_iteration() -> None:
    transport, recorder = _wrap()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"hello")
    assert recorder.calls == []
    assert transport.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nhello")
    await asyncio.sleep(0)
    # Joined: a TLS transport makes one record of each buffer it is handed.
    assert recorder.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\nhello")]
    await asyncio.sleep(0)
    assert len(recorder.calls) == 1  # nothing is sent twice


async def test_held_back_writes_from_the_join_limit_on_leave_as_they_are() -> None:
    transport, recorder = _wrap()
    body = b"x" * JOIN_BELOW
    transport.write(b"head")
    transport.write(body)
    await asyncio.sleep(0)
    assert recorder.calls == [("writelines", [b"head", body])]


async def test_a_large_write_goes_straight_through_after_what_was_held_back() -> None:
    transport, recorder = _wrap()
    big = b"x" * DIRECT_WRITE
    transport.write(big)
    assert recorder.calls == [("write", big)]
    transport.write(b"head")
    transport.write(big)
    assert recorder.calls[1:] == [("writelines", [b"head", big])]


async def test_close_sends_what_is_held_back_first_and_abort_drops_it() -> None:
    transport, recorder = _wrap()
    transport.write(b"last words")
    transport.close()
    assert recorder.calls == [("write", b"last words"), ("close", None)]
    transport, recorder = _wrap()
    transport.write(b"never sent")
    transport.abort()
    await asyncio.sleep(0)
    assert recorder.calls == [("abort", None)]


async def test_everything_else_is_the_transport_s_own() -> None:
    transport, _ = _wrap()
    assert transport.get_extra_info("peername") == "info:peername"
    transport.write(b"")
    assert transport.get_write_buffer_size() == 0
