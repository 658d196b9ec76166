"""The lean upstream client (agent/upstream.py) against the real sample API and scripted servers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.errors import BadRequestHead, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from agent.executor import Executor, RequestHead
from agent.policy import NormalizedURL, normalize_url
from agent.upstream import RAW_BODY_MIN, READ_HIGH_WATER, Client, Response, ResponseBody
from agent.upstream import _Connection as upstream_connection
from backhaul import sampleapi
from relay.tls import generate_dev_certificate
from tests.cycles import collector_off, wait_until_freed

MiB = 1024 * 1024

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def api() -> AsyncIterator[int]:
    """The sample API in this event loop; yields its port."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[int] = loop.create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        sampleapi.serve(port=0, on_ready=lambda h, p: ready.set_result(p), stop=stop)
    )
    yield await ready
    stop.set()
    await task


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Start a tiny server running ``handler`` per connection; returns its port."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> int:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass

        server = await asyncio.start_server(run, "127.0.0.1", 0, ssl=ssl_context)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for writer in writers:
        writer.transport.abort()
    for server in servers:
        server.close()
        await server.wait_closed()


def url(port: int, path: str, scheme: str = "http") -> NormalizedURL:
    return normalize_url(f"{scheme}://127.0.0.1:{port}{path}")


async def read_all(response: Response) -> bytes:
    out = b""
    async for chunk in response.aiter_bytes():
        out += chunk
    await response.aclose()
    return out


async def body_of(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


# --- persistence ------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(api: int) -> None:
    client = Client(max_connections=4)
    for _ in range(5):
        response = await client.request("GET", url(api, "/small"), [], timeout=5)
        assert response.status == 200
        assert ("content-length", "1024") in response.headers
        assert await read_all(response) == sampleapi.pattern_bytes(1024)
    assert client.opened == 1
    assert client.idle(url(api, "/small")) == 1
    await client.aclose()
    assert client.idle(url(api, "/small")) == 0


async def test_next_piece_ends_with_none_and_gives_the_connection_back(api: int) -> None:
    """The body read piece by piece: None at the end (no StopAsyncIteration to raise), the
    connection back in the pool, and None again after that."""
    client = Client(max_connections=4)
    response = await client.request("GET", url(api, "/bytes/300000"), [], timeout=5)
    body = response.aiter_bytes()
    pieces = []
    while (piece := await body.next_piece()) is not None:
        pieces.append(piece)
    assert b"".join(pieces) == sampleapi.pattern_bytes(300_000)
    assert response.bytes_received == 300_000
    assert client.idle(url(api, "/small")) == 1
    assert await body.next_piece() is None
    await response.aclose()
    await client.aclose()


async def test_concurrency_beyond_the_pool_waits(api: int) -> None:
    client = Client(max_connections=2)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one() -> bytes:
        response = await client.request("GET", url(api, "/slow/0.2"), [], timeout=5)
        return await read_all(response)

    results = await asyncio.gather(*(one() for _ in range(5)))
    elapsed = loop.time() - started
    await client.aclose()
    assert all(json.loads(r) == {"slept": 0.2} for r in results)
    assert client.opened == 2
    assert elapsed >= 0.55  # three waves of 0.2 s on two connections, not one wave of five


async def test_waiting_for_a_busy_pool_respects_the_deadline(api: int) -> None:
    client = Client(max_connections=1)
    holder = asyncio.create_task(client.request("GET", url(api, "/slow/3"), [], timeout=10))
    await asyncio.sleep(0.1)
    with pytest.raises(UpstreamTimeout, match=r"connections .* stayed busy"):
        await client.request("GET", url(api, "/small"), [], timeout=0.3)
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    # The cancelled holder's slot is free again.
    response = await client.request("GET", url(api, "/small"), [], timeout=5)
    assert len(await read_all(response)) == 1024
    await client.aclose()


async def test_connection_close_from_the_server_is_not_reused(api: int) -> None:
    client = Client()
    for _ in range(2):
        response = await client.request(
            "GET", url(api, "/small"), [("Connection", "close")], timeout=5
        )
        assert ("connection", "close") in response.headers
        await read_all(response)
    assert client.opened == 2
    await client.aclose()


async def test_connections_the_server_closed_are_freed_without_the_cyclic_collector(
    api: int,
) -> None:
    """An API that closes every connection must not leave each one (its parser, buffers and
    transport) for the cyclic collector's rare full collections."""

    with collector_off():
        client = Client()
        for _ in range(3):
            response = await client.request(
                "GET", url(api, "/small"), [("Connection", "close")], timeout=5
            )
            await read_all(response)
        await wait_until_freed(upstream_connection)
        assert client.opened == 3
        await client.aclose()


@pytest.mark.parametrize("early_close", [False, True])
async def test_a_response_read_with_next_chunk_is_freed_without_the_cyclic_collector(
    api: int, early_close: bool
) -> None:
    """The response and its body reader refer to each other while the body is read; left
    so, every request's pair waited for the collector, which then ran every few hundred
    requests. Reading to the end, or closing early, must undo it."""
    with collector_off():
        client = Client()
        for _ in range(3):
            path = "/bytes/1048576" if early_close else "/small"
            response = await client.request("GET", url(api, path), [], timeout=5)
            if early_close:
                assert await response.next_chunk()
                await response.aclose()  # before the end: closes the connection
            else:
                while await response.next_chunk() is not None:
                    pass
                await response.aclose()
            del response
        await wait_until_freed(Response, ResponseBody)
        await client.aclose()


async def test_connection_close_is_honoured_while_the_socket_stays_open(
    scripted: Callable[..., Awaitable[int]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Says close but leaves the socket open: a client that reused it would wait forever.
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(30)

    port = await scripted(handler)
    client = Client()
    for _ in range(2):
        response = await client.request("GET", url(port, "/x"), [], timeout=2)
        assert await read_all(response) == b"ok"
    assert client.opened == 2
    await client.aclose()


async def test_a_body_not_read_to_its_end_closes_the_connection(api: int) -> None:
    client = Client()
    response = await client.request("GET", url(api, f"/bytes/{8 * MiB}"), [], timeout=5)
    async for _chunk in response.aiter_bytes():
        break
    await response.aclose()
    assert client.idle(url(api, "/small")) == 0
    response = await client.request("GET", url(api, "/small"), [], timeout=5)
    assert len(await read_all(response)) == 1024
    assert client.opened == 2
    await client.aclose()


async def test_http_10_without_keep_alive_is_read_to_eof_and_discarded(
    scripted: Callable[..., Awaitable[int]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    port = await scripted(handler)
    client = Client()
    for _ in range(2):
        response = await client.request("GET", url(port, "/x"), [], timeout=5)
        assert await read_all(response) == b"until the end"
    assert client.opened == 2
    await client.aclose()


async def test_reused_connection_closed_by_the_server_is_retried_when_idempotent(
    scripted: Callable[..., Awaitable[int]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers one request, then drops the kept-alive connection when the next one comes
        # (a server whose keep-alive timeout fired just as the request left).
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_head(reader)
        writer.transport.abort()

    port = await scripted(handler)
    client = Client()
    for _ in range(2):
        response = await client.request("GET", url(port, "/x"), [], timeout=5)
        assert await read_all(response) == b"ok"
    assert client.opened == 2
    # Not for a request with a body: it may have been acted on.
    with pytest.raises(UpstreamError, match="closed a kept-alive connection"):
        await client.request("POST", url(port, "/x"), [], body_of(b"once"), timeout=5)
    await client.aclose()


# --- response bodies --------------------------------------------------------------------------


async def test_chunked_response_is_dechunked(api: int) -> None:
    client = Client()
    response = await client.request("GET", url(api, "/drip/5/20"), [], timeout=5)
    assert ("transfer-encoding", "chunked") in response.headers
    pieces = [chunk async for chunk in response.aiter_bytes()]
    await response.aclose()
    assert b"".join(pieces) == b"".join(b"chunk %d\n" % i for i in range(5))
    assert len(pieces) >= 3  # delivered as they arrive, not collected
    response = await client.request("GET", url(api, "/small"), [], timeout=5)
    assert len(await read_all(response)) == 1024
    assert client.opened == 1
    await client.aclose()


async def test_big_body_streams_with_bounded_buffering(api: int) -> None:
    size = 32 * MiB
    client = Client()
    response = await client.request("GET", url(api, f"/bytes/{size}"), [], timeout=10)
    digest = hashlib.sha256()
    biggest = 0
    count = 0
    async for chunk in response.aiter_bytes():
        digest.update(chunk)
        biggest = max(biggest, len(chunk))
        count += 1
        if count <= 5:
            # A slow consumer: an unbounded reader would pull many MiB in meanwhile.
            await asyncio.sleep(0.1)
    await response.aclose()
    assert response.bytes_received == size
    assert digest.hexdigest() == sampleapi.pattern_sha256(size)
    assert biggest <= READ_HIGH_WATER + 512 * 1024  # the high-water mark plus one read
    await client.aclose()


@pytest.mark.parametrize("size", [RAW_BODY_MIN - 1, RAW_BODY_MIN, 3 * MiB + 7])
async def test_a_long_body_taken_unparsed_keeps_the_connection(api: int, size: int) -> None:
    # Above RAW_BODY_MIN the rest of a Content-Length body skips the parser; the next
    # exchange on the same connection must still be parsed from its first byte.
    client = Client()
    for _ in range(2):
        response = await client.request("GET", url(api, f"/bytes/{size}"), [], timeout=10)
        body = await read_all(response)
        assert len(body) == size
        assert hashlib.sha256(body).hexdigest() == sampleapi.pattern_sha256(size)
        response = await client.request("GET", url(api, "/small"), [], timeout=5)
        assert await read_all(response) == sampleapi.pattern_bytes(1024)
    assert client.opened == 1
    await client.aclose()


async def test_a_long_body_in_odd_pieces_arrives_whole(
    scripted: Callable[..., Awaitable[int]],
) -> None:
    body = bytes(range(256)) * 1000  # 256,000 bytes

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            writer.write(body[:10])  # the head and a sliver: the rest comes unparsed
            await writer.drain()
            at = 10
            for step in (1, 70_000, 3, 100_000, 17):
                await asyncio.sleep(0.01)
                writer.write(body[at : at + step])
                await writer.drain()
                at += step
            writer.write(body[at:])
            await writer.drain()

    client = Client()
    port = await scripted(handler)
    for _ in range(2):
        response = await client.request("GET", url(port, "/x"), [], timeout=5)
        assert await read_all(response) == body
        assert response.bytes_received == len(body)
    assert client.opened == 1
    await client.aclose()


async def test_bytes_past_a_long_body_are_dropped_with_the_connection(
    scripted: Callable[..., Awaitable[int]],
) -> None:
    body = b"b" * (RAW_BODY_MIN + 100)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nb" % len(body))
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(body[1:] + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
            await writer.drain()

    client = Client()
    port = await scripted(handler)
    response = await client.request("GET", url(port, "/x"), [], timeout=5)
    assert await read_all(response) == body
    response = await client.request("GET", url(port, "/x"), [], timeout=5)
    assert await read_all(response) == body
    assert client.opened == 2  # the first connection could not be trusted again
    await client.aclose()


async def test_a_long_body_cut_short_is_an_upstream_error(
    scripted: Callable[..., Awaitable[int]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nx" % (4 * MiB))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"x" * MiB)
        await writer.drain()
        writer.close()

    client = Client()
    response = await client.request("GET", url(await scripted(handler), "/x"), [], timeout=5)
    received = 0
    with pytest.raises(UpstreamError, match="before the body was complete"):
        async for chunk in response.aiter_bytes():
            received += len(chunk)
    assert received == MiB + 1
    await response.aclose()
    await client.aclose()


async def test_head_has_no_body_and_keeps_the_connection(api: int) -> None:
    client = Client()
    response = await client.request("HEAD", url(api, "/small"), [], timeout=5)
    assert response.status == 200
    assert ("content-length", "1024") in response.headers
    assert await read_all(response) == b""
    response = await client.request("GET", url(api, "/small"), [], timeout=5)
    assert await read_all(response) == sampleapi.pattern_bytes(1024)
    assert client.opened == 1
    await client.aclose()


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses(api: int, code: int) -> None:
    client = Client()
    response = await client.request("GET", url(api, f"/status/{code}"), [], timeout=5)
    assert response.status == code
    assert await read_all(response) == b""
    response = await client.request("GET", url(api, "/small"), [], timeout=5)
    assert len(await read_all(response)) == 1024
    assert client.opened == 1
    await client.aclose()


async def test_content_coding_passes_through(scripted: Callable[..., Awaitable[int]]) -> None:
    import gzip

    payload = gzip.compress(b"hello " * 100)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (len(payload), payload)
        )
        await writer.drain()

    client = Client()
    response = await client.request("GET", url(await scripted(handler), "/x"), [], timeout=5)
    assert await read_all(response) == payload
    assert ("content-encoding", "gzip") in response.headers
    assert all(name != "x-trailer" for name, _ in response.headers)
    await client.aclose()


async def test_server_closing_mid_body_is_an_upstream_error(
    scripted: Callable[..., Awaitable[int]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()
        writer.close()

    client = Client()
    response = await client.request("GET", url(await scripted(handler), "/x"), [], timeout=5)
    received = b""
    with pytest.raises(UpstreamError, match="response body") as info:
        async for chunk in response.aiter_bytes():
            received += chunk
    assert received == b"only ten b"
    assert "127.0.0.1" in str(info.value)
    await response.aclose()
    await client.aclose()


async def test_malformed_response_is_an_upstream_error(
    scripted: Callable[..., Awaitable[int]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n")
        await writer.drain()

    client = Client()
    with pytest.raises(UpstreamError, match="broke HTTP"):
        await client.request("GET", url(await scripted(handler), "/x"), [], timeout=5)
    await client.aclose()


async def test_interim_100_continue_is_skipped(api: int) -> None:
    client = Client()
    data = b"x" * 1000
    response = await client.request(
        "POST",
        url(api, "/upload"),
        [("Expect", "100-continue"), ("Content-Length", str(len(data)))],
        body_of(data),
        timeout=5,
    )
    assert response.status == 200
    assert json.loads(await read_all(response)) == {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    await client.aclose()


# --- request bodies ---------------------------------------------------------------------------


async def test_upload_with_content_length(api: int) -> None:
    client = Client()
    chunk = bytes(range(256)) * 1024
    response = await client.request(
        "PUT",
        url(api, "/echo/up"),
        [("Content-Length", str(8 * len(chunk)))],
        body_of(*[chunk] * 8),
        timeout=10,
    )
    record = json.loads(await read_all(response))
    assert record["body_bytes"] == 8 * len(chunk)
    assert record["body_sha256"] == hashlib.sha256(chunk * 8).hexdigest()
    assert record["headers"]["content-length"] == str(8 * len(chunk))
    assert "transfer-encoding" not in record["headers"]
    assert record["headers"]["host"] == f"127.0.0.1:{api}"
    await client.aclose()


async def test_upload_chunked_streams(api: int) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    client = Client()

    async def generator() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield chunk
        yield b""
        yield b"tail"

    response = await client.request("POST", url(api, "/upload"), [], generator(), timeout=20)
    result = json.loads(await read_all(response))
    assert result == {
        "bytes": 20 * MiB + 4,
        "sha256": hashlib.sha256(chunk * 20 + b"tail").hexdigest(),
    }
    response = await client.request("POST", url(api, "/echo/x"), [], body_of(b"ab"), timeout=5)
    record = json.loads(await read_all(response))
    assert record["headers"]["transfer-encoding"] == "chunked"
    assert record["body"] == "ab"
    assert client.opened == 1
    await client.aclose()


async def test_post_without_body_declares_zero_length(api: int) -> None:
    client = Client()
    response = await client.request("POST", url(api, "/echo/x"), [], timeout=5)
    record = json.loads(await read_all(response))
    assert record["headers"]["content-length"] == "0"
    response = await client.request("GET", url(api, "/echo/x"), [], timeout=5)
    record = json.loads(await read_all(response))
    assert "content-length" not in record["headers"]
    assert "transfer-encoding" not in record["headers"]
    await client.aclose()


async def test_body_longer_than_content_length(api: int) -> None:
    client = Client()
    with pytest.raises(BadRequestHead, match="longer than its Content-Length of 5"):
        await client.request(
            "POST",
            url(api, "/upload"),
            [("Content-Length", "5")],
            body_of(b"0123456789"),
            timeout=5,
        )
    assert client.idle(url(api, "/")) == 0
    await asyncio.sleep(0)  # let the aborted connection go
    with pytest.raises(BadRequestHead, match=r"shorter than its Content-Length \(3 of 5"):
        await client.request(
            "POST", url(api, "/upload"), [("Content-Length", "5")], body_of(b"abc"), timeout=5
        )
    with pytest.raises(BadRequestHead, match="CR or LF"):
        await client.request("GET", url(api, "/small"), [("X-A", "1\r\nX-B: 2")], timeout=5)
    # Every failed request closed its connection; a good one opens a fresh one.
    response = await client.request("GET", url(api, "/small"), [], timeout=5)
    assert len(await read_all(response)) == 1024
    assert client.opened == 3
    await client.aclose()


# --- failures and timeouts --------------------------------------------------------------------


async def test_connection_refused(closed_port: int) -> None:
    client = Client()
    with pytest.raises(UpstreamUnreachable, match=f"cannot reach http://127.0.0.1:{closed_port}/x"):
        await client.request(
            "GET", url(closed_port, "/x?password=hunter2"), [], timeout=5, query="api_key=k-1"
        )
    await client.aclose()


async def test_dns_failure_is_unreachable() -> None:
    client = Client()
    with pytest.raises(UpstreamUnreachable, match=r"cannot reach http://nonexistent\.invalid"):
        await client.request("GET", normalize_url("http://nonexistent.invalid/x"), [], timeout=10)
    await client.aclose()


async def test_silent_server_times_out(scripted: Callable[..., Awaitable[int]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    port = await scripted(handler)
    client = Client()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout, match=f"127.0.0.1:{port}/x did not answer in time"):
        await client.request("GET", url(port, "/x"), [], timeout=0.3)
    assert 0.25 < loop.time() - started < 2
    await client.aclose()


async def test_one_timer_serves_a_connection_from_wait_to_wait(api: int) -> None:
    """Waits share their connection's timer instead of arming one each: sequential
    requests with the same timeout leave the first request's timer armed."""
    client = Client()
    response = await client.request("GET", url(api, "/small"), [], timeout=30)
    conn = response._conn
    assert conn is not None
    await read_all(response)
    timer = conn._timer
    assert timer.armed
    first_at = timer.at
    for _ in range(3):
        response = await client.request("GET", url(api, "/small"), [], timeout=30)
        assert response._conn is conn
        await read_all(response)
        assert timer.armed and timer.at == first_at  # not remade for the later deadlines
    # A shorter deadline than the armed one re-arms, and still ends the wait on time.
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout, match="response head"):
        await client.request("GET", url(api, "/slow/2"), [], timeout=0.3)
    assert 0.25 < loop.time() - started < 1.5
    await client.aclose()


async def test_a_timer_that_fires_for_an_earlier_deadline_rearms_for_the_current_one(
    scripted: Callable[..., Awaitable[int]],
) -> None:
    """The connection's timer was armed for a short wait; the next wait has a later
    deadline. When the old timer fires, the wait goes on to its own deadline."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_head(reader)
        await asyncio.sleep(0.6)  # past the first deadline, within the second
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(30)

    port = await scripted(handler)
    client = Client()
    response = await client.request("GET", url(port, "/x"), [], timeout=0.3)
    conn = response._conn
    assert conn is not None
    assert await read_all(response) == b"ok"
    assert conn._timer.armed and conn._timer.at < asyncio.get_running_loop().time() + 0.3
    response = await client.request("GET", url(port, "/x"), [], timeout=2)
    assert response._conn is conn
    assert await read_all(response) == b"ok"
    await client.aclose()
    assert not conn._timer.armed  # a closed connection keeps no timer


async def test_body_silence_times_out(api: int) -> None:
    client = Client()
    response = await client.request("GET", url(api, "/drip/3/1000"), [], timeout=0.3)
    received = b""
    with pytest.raises(UpstreamTimeout, match="response body"):
        async for chunk in response.aiter_bytes():
            received += chunk
    assert received == b"chunk 0\n"
    await response.aclose()
    await client.aclose()


async def test_cancelled_request_closes_its_connection(api: int) -> None:
    client = Client()
    task = asyncio.create_task(client.request("GET", url(api, "/slow/1"), [], timeout=5))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.idle(url(api, "/")) == 0
    # Had the connection gone back to the pool, this would read the /slow answer.
    response = await client.request("GET", url(api, "/small"), [], timeout=5)
    assert await read_all(response) == sampleapi.pattern_bytes(1024)
    assert client.opened == 2
    await client.aclose()


async def test_cancelled_body_read_closes_its_connection(api: int) -> None:
    client = Client(max_connections=1)
    response = await client.request("GET", url(api, "/drip/3/500"), [], timeout=5)

    async def consume() -> None:
        async for _chunk in response.aiter_bytes():
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Without response.aclose(): the cancelled read alone gave the only slot back.
    assert client.idle(url(api, "/")) == 0
    again = await client.request("GET", url(api, "/small"), [], timeout=1)
    assert len(await read_all(again)) == 1024
    assert client.opened == 2
    await response.aclose()
    await client.aclose()


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    generate_dev_certificate(cert, key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return cert, server


async def tls_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
        await writer.drain()


async def test_https_with_the_ca(
    scripted: Callable[..., Awaitable[int]], certificate: tuple[Path, ssl.SSLContext]
) -> None:
    cert, server = certificate
    port = await scripted(tls_ok, server)
    client = Client(ssl_context=ssl.create_default_context(cafile=str(cert)))
    for _ in range(2):
        response = await client.request("GET", url(port, "/x", "https"), [], timeout=5)
        assert await read_all(response) == b"secret"
    assert client.opened == 1
    await client.aclose()


async def test_https_without_the_ca_is_unreachable(
    scripted: Callable[..., Awaitable[int]], certificate: tuple[Path, ssl.SSLContext]
) -> None:
    _, server = certificate
    port = await scripted(tls_ok, server)
    client = Client(ssl_context=ssl.create_default_context())
    with pytest.raises(UpstreamUnreachable, match="certificate verify failed"):
        await client.request("GET", url(port, "/x", "https"), [], timeout=5)
    await client.aclose()


# --- through the executor ---------------------------------------------------------------------


def head(url_text: str, **overrides: Any) -> RequestHead:
    doc: dict[str, Any] = {
        "method": "GET",
        "url": url_text,
        "headers": [],
        "connection_id": "cxn_1",
        "base_url": url_text.rsplit("/", 1)[0] + "/",
        "auth": {"type": "none"},
        "suite": "MLKEM768_X25519/HKDF_SHA256/CHACHA20_POLY1305",
        "sealed": "AAAA",
        "timeout_ms": 5000,
    }
    doc.update(overrides)
    return RequestHead.parse(doc)


async def no_body() -> AsyncIterator[bytes]:
    return
    yield b""


async def test_executor_uses_the_lean_client_unless_auth_needs_httpx(
    make_config: Callable[..., AgentConfig], api: int
) -> None:
    cfg = make_config(allow=[{"cidr": "127.0.0.0/8", "ports": [api]}])
    async with Executor(cfg) as ex:
        lean = ex._lean
        assert lean is not None
        base = f"http://127.0.0.1:{api}/echo/"
        response = await ex.start(head(base + "a", headers=[["X-Trace", "1"]]), {}, no_body())
        record = json.loads(b"".join([c async for c in response.aiter_bytes()]))
        await response.aclose()
        assert record["headers"]["user-agent"].startswith("backhaul-agent/")
        assert record["headers"]["x-trace"] == "1"
        assert all(name != "connection" for name, _ in response.headers)  # hop-by-hop gone
        assert response.bytes_received == len(json.dumps(record, separators=(",", ":")))
        assert lean.opened == 1

        own = head(base + "b", headers=[["user-agent", "caller/2"]])
        response = await ex.start(own, {}, no_body())
        record = json.loads(b"".join([c async for c in response.aiter_bytes()]))
        await response.aclose()
        assert record["headers"]["user-agent"] == "caller/2"

        key = head(
            base + "c?x=1",
            auth={"type": "api_key", "api_key_name": "code", "api_key_in": "query"},
        )
        response = await ex.start(key, {"api_key": "k-1"}, no_body())
        record = json.loads(b"".join([c async for c in response.aiter_bytes()]))
        await response.aclose()
        assert record["query"] == "x=1&code=k-1"

        basic = head(base + "d", auth={"type": "basic"})
        response = await ex.start(basic, {"username": "u", "password": "p"}, no_body())
        record = json.loads(b"".join([c async for c in response.aiter_bytes()]))
        await response.aclose()
        assert record["headers"]["authorization"] == "Basic dTpw"  # base64("u:p")
        assert lean.opened == 1  # one kept-alive connection served every request
        assert lean.idle(normalize_url(base)) == 1


async def test_executor_bounds_every_path_to_the_deadline(
    make_config: Callable[..., AgentConfig], scripted: Callable[..., Awaitable[int]]
) -> None:
    """A bodiless request to a target the allow-list matches without DNS runs without the
    executor's own timeout scope: the lean client's deadline cuts a silent API just the
    same. With a body, or a name to resolve, the scope stays."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    port = await scripted(handler)
    target = f"http://127.0.0.1:{port}/api/x"
    async with Executor(make_config(allow=[{"cidr": "127.0.0.0/8", "ports": [port]}])) as ex:
        assert ex.policy.allowed_without_dns(target) is not None
        loop = asyncio.get_running_loop()
        for has_body in (False, True):
            started = loop.time()
            with pytest.raises(UpstreamTimeout):
                await ex.start(head(target, timeout_ms=300), {}, no_body(), has_body=has_body)
            assert 0.25 < loop.time() - started < 1.5

        async def silent_body() -> AsyncIterator[bytes]:
            await asyncio.sleep(30)
            yield b"never"

        post = head(target, method="POST", timeout_ms=300)
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match="300 ms deadline"):
            await ex.start(post, {}, silent_body(), has_body=True)
        assert 0.25 < loop.time() - started < 1.5
    named = make_config(allow=[{"host": "localhost", "ports": [port]}])
    async with Executor(named) as ex:
        assert ex.policy.allowed_without_dns(f"http://localhost:{port}/api/x") is not None
    by_cidr = make_config(allow=[{"cidr": "127.0.0.0/8", "ports": [port]}])
    async with Executor(by_cidr) as ex:
        assert ex.policy.allowed_without_dns(f"http://localhost:{port}/api/x") is None
        assert ex.policy.allowed_without_dns("not a url") is None


async def test_executor_tls_verify_off_uses_the_lean_client(
    make_config: Callable[..., AgentConfig],
    scripted: Callable[..., Awaitable[int]],
    certificate: tuple[Path, ssl.SSLContext],
) -> None:
    _, server = certificate
    port = await scripted(tls_ok, server)
    target = f"https://127.0.0.1:{port}/api/x"
    allow = [{"cidr": "127.0.0.0/8", "ports": [port]}]
    async with Executor(make_config(allow=allow)) as ex:
        with pytest.raises(UpstreamUnreachable, match="certificate"):
            await ex.start(head(target), {}, no_body())
    async with Executor(make_config(allow=allow, upstream={"verify": False})) as ex:
        response = await ex.start(head(target), {}, no_body())
        assert b"".join([c async for c in response.aiter_bytes()]) == b"secret"
        await response.aclose()
        assert ex._lean is not None and ex._lean.opened == 1
