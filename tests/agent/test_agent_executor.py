from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from agent.config import AgentConfig
from agent.errors import (
    BadRequestHead,
    CredentialsInvalid,
    TargetDenied,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from agent.executor import Executor, RequestHead, strip_hop_by_hop

MiB = 1024 * 1024


def make_head(url: str, base_url: str | None = None, **overrides: Any) -> RequestHead:
    doc: dict[str, Any] = {
        "method": "GET",
        "url": url,
        "headers": [["accept", "*/*"]],
        "connection_id": "cxn_1",
        "base_url": base_url if base_url is not None else url.split("/api/")[0] + "/api/",
        "auth": {"type": "none"},
        "suite": "MLKEM768_X25519/HKDF_SHA256/CHACHA20_POLY1305",
        "sealed": "AAAA",
        "timeout_ms": 10000,
    }
    doc.update(overrides)
    return RequestHead.parse(doc)


async def no_body() -> AsyncIterator[bytes]:
    return
    yield b""


async def body_of(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def read_all(response: Any) -> bytes:
    """The body as the dispatcher reads it (``next_chunk``, None at the end)."""
    out = b""
    while (chunk := await response.next_chunk()) is not None:
        out += chunk
    assert await response.next_chunk() is None
    await response.aclose()
    return out


# --- unit level: MockTransport ----------------------------------------------------------------


def mock_executor(
    make_config: Callable[..., AgentConfig], handler: Callable[[httpx.Request], Any]
) -> Executor:
    cfg = make_config(allow=[{"prefix": "http://api.test/api/"}])
    return Executor(cfg, transport=httpx.MockTransport(handler))


async def test_hop_by_hop_and_caller_secrets_stripped_both_ways(
    make_config: Callable[..., AgentConfig],
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            headers=[
                ("Connection", "close, X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("Proxy-Authenticate", "Basic"),
                ("Upgrade", "h2c"),
                ("Trailer", "x"),
                ("Content-Type", "text/plain"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ],
            content=b"hello",
        )

    head = make_head(
        "http://api.test/api/x",
        headers=[
            ["Connection", "X-Secret-Hop, keep-alive"],
            ["X-Secret-Hop", "1"],
            ["Keep-Alive", "300"],
            ["TE", "trailers"],
            ["Trailer", "x"],
            ["Transfer-Encoding", "chunked"],
            ["Upgrade", "websocket"],
            ["Proxy-Authorization", "Basic Zm9vOmJhcg=="],
            ["Proxy-Connection", "keep-alive"],
            ["Host", "evil.example"],
            ["Authorization", "Bearer caller-token"],
            ["Cookie", "caller=1"],
            ["X-Keep", "yes"],
        ],
    )
    async with mock_executor(make_config, handler) as ex:
        response = await ex.start(head, {}, no_body())
        assert await read_all(response) == b"hello"
    sent = seen[0]
    names = {k.lower() for k in sent.headers}
    for gone in (
        "connection",
        "x-secret-hop",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "authorization",
        "cookie",
    ):
        assert gone not in names, gone
    assert sent.headers["host"] == "api.test"
    assert set(names) == {"host", "x-keep", "user-agent"}
    assert sent.headers["x-keep"] == "yes"
    assert response.status == 200
    assert response.headers == [
        ("content-type", "text/plain"),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
        ("content-length", "5"),
    ]


def test_strip_hop_by_hop_function() -> None:
    assert strip_hop_by_hop([("Connection", "A,  b"), ("a", "1"), ("B", "2"), ("c", "3")]) == [
        ("c", "3")
    ]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), UpstreamUnreachable),
        (httpx.ConnectTimeout("timed out"), UpstreamUnreachable),
        (httpx.ReadTimeout("timed out"), UpstreamTimeout),
        (httpx.WriteTimeout("timed out"), UpstreamTimeout),
        (httpx.PoolTimeout("timed out"), UpstreamTimeout),
        (httpx.RemoteProtocolError("illegal header"), UpstreamError),
        (httpx.ReadError("connection reset"), UpstreamError),
    ],
)
async def test_httpx_errors_mapped(
    make_config: Callable[..., AgentConfig], exc: Exception, expected: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async with mock_executor(make_config, handler) as ex:
        with pytest.raises(expected) as info:
            await ex.start(make_head("http://api.test/api/x?password=hunter2"), {}, no_body())
    assert "api.test" in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_error_mid_body_mapped(make_config: Callable[..., AgentConfig]) -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"first"
            raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Broken())

    async with mock_executor(make_config, handler) as ex:
        response = await ex.start(make_head("http://api.test/api/x"), {}, no_body())
        with pytest.raises(UpstreamError, match="response body"):
            await read_all(response)


async def test_denied_targets_never_reach_transport(
    make_config: Callable[..., AgentConfig],
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("must not be called")

    async with mock_executor(make_config, handler) as ex:
        for url, base in [
            ("http://other.test/api/x", "http://other.test/api/"),  # not in the allow-list
            ("http://api.test/admin", "http://api.test/"),  # allowed host, path outside prefix
            ("http://api.test/api/../admin", "http://api.test/api/"),
            ("http://api.test/api/x", "http://api.test/api/v2/"),  # outside the base URL
            ("http://api.test/api/x", "http://api.test:81/api/"),  # base URL on another origin
        ]:
            with pytest.raises(TargetDenied):
                await ex.start(make_head(url, base), {}, no_body())


async def test_base_url_check_names_connection(make_config: Callable[..., AgentConfig]) -> None:
    async with mock_executor(make_config, lambda r: httpx.Response(200)) as ex:
        with pytest.raises(TargetDenied, match=r"outside the base URL .* of connection cxn_1"):
            await ex.start(
                make_head("http://api.test/api/x", "http://api.test/api/y/"), {}, no_body()
            )


async def test_no_cookie_jar_shared_between_requests(
    make_config: Callable[..., AgentConfig],
) -> None:
    cookies: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cookies.append(request.headers.get("cookie"))
        return httpx.Response(200, headers={"set-cookie": "session=abc; Path=/"})

    async with mock_executor(make_config, handler) as ex:
        for _ in range(2):
            await (await ex.start(make_head("http://api.test/api/x"), {}, no_body())).aclose()
    assert cookies == [None, None]


async def test_redirects_not_followed(make_config: Callable[..., AgentConfig]) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(302, headers={"location": "http://evil.example/"})

    async with mock_executor(make_config, handler) as ex:
        response = await ex.start(make_head("http://api.test/api/x"), {}, no_body())
        await response.aclose()
    assert response.status == 302
    assert ("location", "http://evil.example/") in response.headers
    assert calls == 1


async def test_missing_credentials_field(make_config: Callable[..., AgentConfig]) -> None:
    async with mock_executor(make_config, lambda r: httpx.Response(200)) as ex:
        head = make_head("http://api.test/api/x", auth={"type": "basic"})
        with pytest.raises(CredentialsInvalid, match="'password' is missing"):
            await ex.start(head, {"username": "u"}, no_body())
        head = make_head(
            "http://api.test/api/x",
            auth={"type": "api_key", "api_key_name": "X-Key", "api_key_in": "header"},
        )
        with pytest.raises(CredentialsInvalid, match="'api_key' is not a string"):
            await ex.start(head, {"api_key": 5}, no_body())
        with pytest.raises(CredentialsInvalid, match="not a valid header value"):
            await ex.start(head, {"api_key": "a\r\nb"}, no_body())


async def test_get_without_body_sends_no_framing(make_config: Callable[..., AgentConfig]) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async with mock_executor(make_config, handler) as ex:
        await (await ex.start(make_head("http://api.test/api/x"), {}, no_body())).aclose()
    assert "transfer-encoding" not in seen[0].headers
    assert "content-length" not in seen[0].headers


def test_bad_head_is_its_own_error() -> None:
    with pytest.raises(BadRequestHead):
        make_head("http://api.test/api/x", method="G E T")


# --- integration level: a real local HTTP server ----------------------------------------------


def real_executor(make_config: Callable[..., AgentConfig], port: int, **kw: Any) -> Executor:
    return Executor(make_config(allow=[{"cidr": "127.0.0.0/8", "ports": [port]}], **kw))


async def test_basic_auth_reaches_server(
    make_config: Callable[..., AgentConfig], upstream: Any
) -> None:
    async with real_executor(make_config, upstream.port) as ex:
        head = make_head(
            f"{upstream.base}/api/echo?q=1",
            auth={"type": "basic"},
            headers=[["authorization", "Bearer caller"], ["x-trace", "t1"]],
        )
        response = await ex.start(head, {"username": "alice", "password": "s3cr3t:x"}, no_body())
        record = json.loads(await read_all(response))
    headers = dict(record["headers"])
    expected = base64.b64encode(b"alice:s3cr3t:x").decode()
    assert headers["authorization"] == f"Basic {expected}"
    assert [k for k, _ in record["headers"]].count("authorization") == 1
    assert headers["x-trace"] == "t1"
    assert record["query"] == "q=1"
    assert ("x-upstream", "yes") in response.headers


async def test_api_key_header(make_config: Callable[..., AgentConfig], upstream: Any) -> None:
    async with real_executor(make_config, upstream.port) as ex:
        head = make_head(
            f"{upstream.base}/api/echo",
            auth={"type": "api_key", "api_key_name": "X-API-Key", "api_key_in": "header"},
            headers=[["x-api-key", "caller-supplied"]],
        )
        record = json.loads(await read_all(await ex.start(head, {"api_key": "k-123"}, no_body())))
    values = [v for k, v in record["headers"] if k == "x-api-key"]
    assert values == ["k-123"]


async def test_api_key_query(make_config: Callable[..., AgentConfig], upstream: Any) -> None:
    async with real_executor(make_config, upstream.port) as ex:
        head = make_head(
            f"{upstream.base}/api/echo?a=1&api_key=caller&b=x%20y",
            auth={"type": "api_key", "api_key_name": "api_key", "api_key_in": "query"},
        )
        key = "k/1+2=3&x"
        record = json.loads(await read_all(await ex.start(head, {"api_key": key}, no_body())))
        assert record["params"] == {"a": ["1"], "b": ["x y"], "api_key": [key]}
        head = make_head(
            f"{upstream.base}/api/echo",
            auth={"type": "api_key", "api_key_name": "code", "api_key_in": "query"},
        )
        record = json.loads(await read_all(await ex.start(head, {"api_key": "z"}, no_body())))
        assert record["query"] == "code=z"
        head = make_head(
            f"{upstream.base}/api/echo?keep=%2F+as+is",
            auth={"type": "api_key", "api_key_name": "code", "api_key_in": "query"},
        )
        record = json.loads(await read_all(await ex.start(head, {"api_key": "z"}, no_body())))
        assert record["query"] == "keep=%2F+as+is&code=z"


async def test_post_body_and_method(make_config: Callable[..., AgentConfig], upstream: Any) -> None:
    async with real_executor(make_config, upstream.port) as ex:
        head = make_head(
            f"{upstream.base}/api/echo",
            method="PATCH",
            headers=[["content-type", "application/json"], ["content-length", "10"]],
        )
        response = await ex.start(head, {}, body_of(b'{"a":', b"1234}"))
        record = json.loads(await read_all(response))
        assert record["method"] == "PATCH"
        assert record["body"] == '{"a":1234}'
        assert dict(record["headers"])["content-length"] == "10"
        assert "transfer-encoding" not in dict(record["headers"])
        assert dict(record["headers"])["user-agent"].startswith("backhaul-agent/")
        assert "accept-encoding" not in dict(record["headers"])

        wrong = make_head(
            f"{upstream.base}/api/echo", method="POST", headers=[["content-length", "11"]]
        )
        with pytest.raises(BadRequestHead, match="Content-Length"):
            await ex.start(wrong, {}, body_of(b'{"a":', b"1234}"))


async def test_upload_50_mib_streams(
    make_config: Callable[..., AgentConfig], upstream: Any
) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    produced = 0

    async def generator() -> AsyncIterator[bytes]:
        nonlocal produced
        for i in range(50):
            if i == 8:
                # If the executor buffered the body before sending, the server would never
                # have seen a byte by now and this wait would time out.
                await asyncio.wait_for(upstream.first_upload_chunk.wait(), 10)
            produced += len(chunk)
            yield chunk

    async with real_executor(make_config, upstream.port) as ex:
        head = make_head(f"{upstream.base}/api/upload", method="PUT", timeout_ms=60000)
        response = await ex.start(head, {}, generator())
        result = json.loads(await read_all(response))
    assert produced == 50 * MiB
    assert result["bytes"] == 50 * MiB
    assert result["sha256"] == hashlib.sha256(chunk * 50).hexdigest()
    assert "transfer-encoding" in dict(result["headers"])  # streamed, length unknown up front


async def test_download_50_mib_streams(
    make_config: Callable[..., AgentConfig], upstream: Any
) -> None:
    size = 50 * MiB
    async with real_executor(make_config, upstream.port) as ex:
        head = make_head(f"{upstream.base}/api/download?size={size}", timeout_ms=60000)
        response = await ex.start(head, {}, no_body())
        assert ("content-length", str(size)) in response.headers
        total = 0
        biggest = 0
        async for piece in response.aiter_bytes():
            total += len(piece)
            biggest = max(biggest, len(piece))
            upstream.client_got_download.set()
        await response.aclose()
    assert total == size
    assert biggest <= 4 * MiB


async def test_unreachable_port(make_config: Callable[..., AgentConfig], closed_port: int) -> None:
    async with real_executor(make_config, closed_port) as ex:
        head = make_head(f"http://127.0.0.1:{closed_port}/api/x")
        with pytest.raises(UpstreamUnreachable, match=f"127.0.0.1:{closed_port}"):
            await ex.start(head, {}, no_body())


async def test_slow_server_hits_deadline(
    make_config: Callable[..., AgentConfig], upstream: Any
) -> None:
    async with real_executor(make_config, upstream.port) as ex:
        head = make_head(f"{upstream.base}/api/slow", timeout_ms=300)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await ex.start(head, {}, no_body())
        assert loop.time() - started < 2


async def test_stalled_body_read_timeout(
    make_config: Callable[..., AgentConfig], upstream: Any
) -> None:
    async with real_executor(make_config, upstream.port) as ex:
        head = make_head(f"{upstream.base}/api/stall", timeout_ms=300)
        response = await ex.start(head, {}, no_body())
        received = b""
        with pytest.raises(UpstreamTimeout):
            async for piece in response.aiter_bytes():
                received += piece
        await response.aclose()
    assert received == b"partial"


async def test_content_encoding_passes_through(make_config: Callable[..., AgentConfig]) -> None:
    import gzip

    payload = gzip.compress(b"hello " * 100)

    class Raw(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield payload[:10]
            yield payload[10:]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-encoding": "gzip"}, stream=Raw())

    async with mock_executor(make_config, handler) as ex:
        response = await ex.start(make_head("http://api.test/api/x"), {}, no_body())
        assert await read_all(response) == payload
    assert ("content-encoding", "gzip") in response.headers
