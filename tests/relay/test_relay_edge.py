"""The direct invoke path (relay.edge): which requests take it, and the bytes it writes.

The answers are written through uvicorn's own request cycle, so these tests build a real
``RequestResponseCycle`` over a recording transport. The whole path through real relay and
agent processes is in tests/e2e/test_invoke.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from relay import edge
from relay.coalesce import CoalescingTransport
from relay.edge import BODY_HIGH_WATER, DirectBody, DirectReply, eligible
from relay.edge_http import EdgeHttpProtocol, EdgeSettings
from relay.limits import http_protocol
from tests.relay.relay_helpers import make_config

INVOKE = "/v1/connections/cxn_0123456789abcdef0123/invoke/small"


def scope(
    path: str = INVOKE,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": headers or [],
    }


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, True),
        ({"method": "DELETE"}, True),
        ({"headers": [(b"content-length", b"7")]}, True),
        ({"headers": [(b"content-length", b"0")]}, True),
        ({"path": "/v1/connections"}, False),
        ({"path": "/v1/connections/cxn_1/invokes/x"}, False),
        ({"method": "TRACE"}, False),
        ({"query": b"q=" + b"x" * 200}, False),  # 414 comes from the limits middleware
        ({"headers": [(b"content-length", b"1001")]}, False),  # 413 likewise
        ({"headers": [(b"transfer-encoding", b"chunked")]}, False),  # counted as it streams
        ({"headers": [(b"content-length", b"1"), (b"content-length", b"1")]}, False),
        ({"headers": [(b"content-length", b"-1")]}, False),
    ],
)
def test_eligible_only_where_no_middleware_has_work(kwargs: dict[str, Any], expected: bool) -> None:
    assert eligible(scope(**kwargs), max_url=200, max_body=1000) is expected


def test_no_body_limit_takes_any_declared_length() -> None:
    assert eligible(scope(headers=[(b"content-length", b"99999999")]), 200, 0)


class Recorder:
    """A transport that keeps what is written, in order."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        #: ``write`` and ``writelines`` calls: system calls, on a real transport.
        self.writes = 0
        self.closed = False
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.chunks.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.writes += 1
        self.chunks.extend(bytes(chunk) for chunk in chunks)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Cycle:
    """A real uvicorn request cycle for one request, over a :class:`Recorder`."""

    def __init__(
        self, method: str = "GET", keep_alive: bool = True, coalescing: bool = False
    ) -> None:
        self.transport = Recorder()
        self.completed = 0
        transport: Any = self.transport
        if coalescing:  # as the relay's HTTP protocol wraps every caller connection
            transport = CoalescingTransport(transport, asyncio.get_running_loop())
        self.cycle = RequestResponseCycle(
            scope=scope(method=method),  # type: ignore[arg-type]
            transport=transport,
            flow=FlowControl(self.transport),  # type: ignore[arg-type]
            logger=logging.getLogger("test"),
            access_logger=logging.getLogger("test.access"),
            access_log=False,
            default_headers=[(b"date", b"Thu, 03 Dec 2026 10:00:00 GMT")],
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=keep_alive,
            on_response=self._done,
        )
        self.reply = DirectReply(self.cycle)

    def _done(self) -> None:
        self.completed += 1


async def test_content_length_answer_is_head_and_body() -> None:
    c = Cycle()
    await c.reply.start(200, [(b"content-type", b"text/plain"), (b"content-length", b"5")])
    await c.reply.body(b"hello", False)
    assert c.transport.data == (
        b"HTTP/1.1 200 OK\r\ndate: Thu, 03 Dec 2026 10:00:00 GMT\r\n"
        b"content-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"
    )
    assert c.cycle.response_complete and c.completed == 1 and not c.transport.closed
    assert (c.reply.status, c.reply.sent, c.reply.declared, c.reply.finished) == (200, 5, 5, True)


async def test_a_whole_answer_leaves_at_once_in_one_write() -> None:
    """Through the caller's coalescing transport the head waits for its body, and the whole
    answer is written as soon as its body ends: not at the end of the loop iteration, after
    the request's own bookkeeping, which the caller would wait for."""
    c = Cycle(coalescing=True)
    await c.reply.start(200, [(b"content-length", b"5")])
    assert c.transport.writes == 0
    await c.reply.body(b"hello", False)
    assert c.transport.writes == 1 and c.transport.data.endswith(b"\r\n\r\nhello")
    await asyncio.sleep(0)  # the flush the first write scheduled finds nothing left
    assert c.transport.writes == 1


async def test_under_load_answers_leave_together_at_the_end_of_the_iteration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With other requests being answered, a whole answer waits for the end of the loop
    iteration, where the answers finished in it leave one after another."""
    monkeypatch.setattr(edge, "_answering", 2)
    c = Cycle(coalescing=True)
    await c.reply.start(200, [(b"content-length", b"5")])
    await c.reply.body(b"hello", False)
    assert c.transport.writes == 0
    await asyncio.sleep(0)
    assert c.transport.writes == 1 and c.transport.data.endswith(b"\r\n\r\nhello")


async def test_a_streamed_answer_is_held_only_until_its_end() -> None:
    c = Cycle(coalescing=True)
    await c.reply.start(200, [])
    await c.reply.body(b"abc", True)
    assert c.transport.writes == 0
    await c.reply.body(b"def", False)
    assert c.transport.writes == 1
    assert c.transport.data.endswith(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")


async def test_the_apis_date_stands_and_the_relays_is_not_added() -> None:
    """Date is a singleton field: the API's answer keeps its own, and the relay adds one only
    to an answer without it (RFC 9110 §6.6.1)."""
    c = Cycle()
    api_date = b"Thu, 03 Dec 2026 09:59:59 GMT"
    await c.reply.start(200, [(b"date", api_date), (b"content-length", b"0")])
    await c.reply.body(b"", False)
    head = c.transport.data.lower()
    assert head.count(b"\r\ndate:") == 1 and b"date: " + api_date.lower() in head
    assert head.startswith(b"http/1.1 200 ok\r\ndate: ")


async def test_no_length_is_chunked_small_and_bulk_chunks_alike() -> None:
    c = Cycle()
    bulk = b"x" * 20000
    await c.reply.start(200, [(b"content-type", b"text/plain")])
    await c.reply.body(b"abc", True)
    await c.reply.body(bulk, True)
    await c.reply.body(b"", False)
    head, _, body = c.transport.data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    assert body == b"3\r\nabc\r\n" + b"4e20\r\n" + bulk + b"\r\n0\r\n\r\n"
    assert c.reply.sent == 20003 and c.completed == 1


async def test_last_chunk_and_terminator_leave_together() -> None:
    c = Cycle()
    await c.reply.start(200, [])
    await c.reply.body(b"end", False)
    assert c.transport.chunks[-1] == b"3\r\nend\r\n0\r\n\r\n"


async def test_head_has_no_body_whatever_the_length() -> None:
    c = Cycle(method="HEAD")
    await c.reply.start(200, [(b"content-length", b"1024")])
    await c.reply.body(b"", False)
    assert c.transport.data.endswith(b"content-length: 1024\r\n\r\n")
    assert c.cycle.response_complete and c.completed == 1


@pytest.mark.parametrize("status", [304, 204])
async def test_bodiless_status_keeps_its_content_length_and_sends_no_body(status: int) -> None:
    """A 304 may carry the Content-Length of the representation it stands for (RFC 9110
    §8.6): the answer ends after its head, and the connection stays usable."""
    c = Cycle()
    await c.reply.start(status, [(b"etag", b'"v1"'), (b"content-length", b"1024")])
    await c.reply.body(b"", False)
    assert c.transport.data.endswith(b"content-length: 1024\r\n\r\n")
    assert b"transfer-encoding" not in c.transport.data
    assert c.cycle.response_complete and c.completed == 1 and not c.transport.closed


async def test_no_keep_alive_says_close_and_closes() -> None:
    c = Cycle(keep_alive=False)
    await c.reply.start(204, [])
    await c.reply.body(b"", False)
    assert b"connection: close\r\n" in c.transport.data
    assert b"transfer-encoding" not in c.transport.data  # 204 has no body to frame
    assert c.transport.closed


async def test_agent_connection_close_ends_keep_alive() -> None:
    c = Cycle()
    await c.reply.start(200, [(b"connection", b"Keep-Alive, close"), (b"content-length", b"0")])
    await c.reply.body(b"", False)
    assert c.transport.data.count(b"connection:") == 1
    assert not c.cycle.keep_alive and c.transport.closed


@pytest.mark.parametrize(
    "header",
    [
        (b"x-evil", b"a\r\nset-cookie: stolen=1"),
        (b"x-evil", b"a\nb"),
        (b"x-evil", b"nul\x00"),
        (b"bad name", b"v"),
        (b"x:y", b"v"),
    ],
)
async def test_header_that_could_split_the_response_writes_nothing(
    header: tuple[bytes, bytes],
) -> None:
    c = Cycle()
    with pytest.raises(RuntimeError, match="invalid response header"):
        await c.reply.start(200, [(b"content-length", b"0"), header])
    assert c.transport.chunks == []
    assert not c.reply.started and not c.cycle.response_started  # a 500 can still be sent


async def test_tab_inside_a_value_is_allowed() -> None:
    c = Cycle()
    await c.reply.start(200, [(b"x-list", b"a\tb"), (b"content-length", b"0")])
    assert b"x-list: a\tb\r\n" in c.transport.data


async def test_body_longer_or_shorter_than_its_length_is_an_error() -> None:
    c = Cycle()
    await c.reply.start(200, [(b"content-length", b"3")])
    with pytest.raises(RuntimeError, match="longer"):
        await c.reply.body(b"abcd", False)
    c = Cycle()
    await c.reply.start(200, [(b"content-length", b"3")])
    with pytest.raises(RuntimeError, match="shorter"):
        await c.reply.body(b"ab", False)
    assert not c.cycle.response_complete


async def test_invalid_content_length_is_refused() -> None:
    c = Cycle()
    with pytest.raises(RuntimeError, match="Content-Length"):
        await c.reply.start(200, [(b"content-length", b"12, 12")])


async def test_problem_body_is_kept_for_the_admin_page() -> None:
    c = Cycle()
    doc = json.dumps({"title": "Nope", "detail": "not today"}).encode()
    await c.reply.start(
        404, [(b"content-type", b"application/problem+json"), (b"content-length", b"%d" % len(doc))]
    )
    await c.reply.body(doc, False)
    assert c.reply.summary() == (404, "Nope", "not today")


async def test_disconnected_caller_gets_nothing_written() -> None:
    c = Cycle()
    c.cycle.disconnected = True
    await c.reply.start(200, [(b"content-length", b"2")])
    await c.reply.body(b"hi", False)
    assert c.transport.chunks == [] and c.completed == 0


def _edge(factory: object) -> EdgeSettings | None:
    """The settings a protocol factory gives the edge protocol; None: not the edge protocol."""
    if isinstance(factory, functools.partial) and factory.func is EdgeHttpProtocol:
        settings = factory.keywords["edge"]
        assert isinstance(settings, EdgeSettings)
        return settings
    return None


def test_protocol_takes_the_direct_path_only_when_nothing_forbids_it(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    app = object()
    direct = _edge(http_protocol(config, "httptools", app=app))
    assert direct is not None and direct.direct_app is app
    assert direct.max_url == config.max_url_bytes and direct.max_body == config.max_body_bytes
    without_app = _edge(http_protocol(config, "httptools"))
    assert without_app is not None and without_app.direct_app is None
    assert _edge(http_protocol(config, "h11", app=app)) is None
    proxied = make_config(tmp_path / "p", trusted_proxies=["127.0.0.1"])
    behind_proxy = _edge(http_protocol(proxied, "httptools", app=app))
    assert behind_proxy is not None and behind_proxy.direct_app is None


class EmptyStream:
    """A tunnel stream whose answer has no body."""

    id = 1
    at_end = True

    async def read(self) -> bytes:
        return b""

    async def reset(self, *args: object) -> None:
        raise AssertionError("a complete answer is not reset")


@pytest.mark.parametrize("status", [304, 204])
async def test_asgi_path_bodiless_answer_completes_under_uvicorns_send(status: int) -> None:
    """Through ASGI (chunked uploads, trusted proxies) uvicorn's own send takes the answer:
    it would wait for the body a Content-Length announces, so a 304's is left out there."""
    from relay.invoke import TunnelResponse

    c = Cycle()
    response = TunnelResponse(
        EmptyStream(),  # type: ignore[arg-type]
        None,
        False,
        status,
        [(b"etag", b'"v1"'), (b"content-length", b"1024")],
    )
    await response({}, c.cycle.receive, c.cycle.send)  # type: ignore[arg-type]
    assert c.cycle.response_complete and not c.transport.closed
    assert b"content-length" not in c.transport.data
    assert b'etag: "v1"' in c.transport.data


# --- the request body (DirectBody) -------------------------------------------------------------


async def test_body_pieces_are_handed_on_as_they_came() -> None:
    cycle = Cycle("POST").cycle
    body = DirectBody(cycle)
    piece = b"x" * 200_000
    body.feed(piece)
    message = await body.receive()
    assert message == {"type": "http.request", "body": piece, "more_body": True}
    assert message["body"] is piece  # not copied
    body.feed(b"ab")
    body.feed(b"cd")
    cycle.more_body = False
    assert await body.receive() == {"type": "http.request", "body": b"abcd", "more_body": False}


async def test_waiting_bulk_pieces_go_one_per_receive_and_small_runs_joined() -> None:
    cycle = Cycle("POST").cycle
    body = DirectBody(cycle)
    big, other = b"B" * 100_000, b"C" * 70_000
    for piece in (b"a", b"b", big, other, b"c"):
        body.feed(piece)
    cycle.more_body = False  # all of it has arrived: the pieces still come one by one
    messages = [await asyncio.wait_for(body.receive(), 1) for _ in range(4)]
    assert [m["body"] for m in messages] == [b"ab", big, other, b"c"]
    assert messages[1]["body"] is big and messages[2]["body"] is other  # not copied
    assert [m["more_body"] for m in messages] == [True, True, True, False]


async def test_reading_pauses_above_the_high_water_mark_and_resumes_on_receive() -> None:
    wrapper = Cycle("POST")
    body = DirectBody(wrapper.cycle)
    body.feed(b"x" * BODY_HIGH_WATER)
    assert wrapper.transport.reading  # one full read is not a backlog
    body.feed(b"y")
    assert not wrapper.transport.reading
    body.feed(b"x" * BODY_HIGH_WATER)
    assert len((await body.receive())["body"]) == BODY_HIGH_WATER
    assert not wrapper.transport.reading  # still above the mark
    assert (await body.receive())["body"] == b"y"
    assert wrapper.transport.reading


async def test_a_pipelined_body_buffered_before_its_turn_comes_first() -> None:
    cycle = Cycle("POST").cycle
    cycle.body += b"early "
    body = DirectBody(cycle)
    assert cycle.body == b""
    body.feed(b"late")
    cycle.more_body = False
    assert (await body.receive())["body"] == b"early late"


async def test_expect_100_continue_is_answered_on_the_first_receive() -> None:
    wrapper = Cycle("PUT")
    cycle = wrapper.cycle
    cycle.waiting_for_100_continue = True
    body = DirectBody(cycle)
    body.feed(b"data")
    cycle.more_body = False
    assert (await body.receive())["body"] == b"data"
    assert wrapper.transport.data == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not cycle.waiting_for_100_continue


async def test_a_gone_caller_is_a_disconnect_and_nothing_waits() -> None:
    cycle = Cycle("POST").cycle
    body = DirectBody(cycle)
    cycle.disconnected = True
    assert await asyncio.wait_for(body.receive(), 1) == {"type": "http.disconnect"}
