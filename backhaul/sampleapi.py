"""A small, fast HTTP/1.1 "internal API" used by the demo, the tests and the benchmark.

It is written directly on asyncio streams with a strict hand-written HTTP/1.1 parser
(keep-alive, pipelining, chunked and Content-Length request bodies, ``Expect:
100-continue``, HEAD) so that it is never the bottleneck of a measurement.

Endpoints::

    GET  /hello                    JSON greeting
    GET  /small                    exactly 1024 bytes
    GET  /bytes/{n}                n bytes, streamed in 64 KiB chunks (see pattern_bytes)
    POST|PUT /upload               {"bytes": n, "sha256": hex} of the request body
    ANY  /echo/...                 the request as JSON (method, path, query, headers, body digest)
    GET  /basic/...                needs the configured Basic credentials
    GET  /apikey/...               needs the configured API key (header or query parameter)
    ANY  /slow/{seconds}           answers after a delay (a request body is read first)
    GET  /drip/{n}/{interval_ms}   n small chunks, one every interval_ms (chunked encoding)
    GET  /status/{code}            answers with that status

Command line::

    python -m backhaul.sampleapi --host 127.0.0.1 --port 0 --ready-file /tmp/api.json

The ready file is written atomically once the socket listens; it holds JSON
``{"host", "port", "url", "pid"}``.  From Python, use :func:`start_in_thread` (same
process), :func:`start_subprocess` (child process) or :func:`serve` / :func:`start_server`
(inside a running event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qsl

__all__ = [
    "CHUNK_SIZE",
    "SMALL_SIZE",
    "RunningServer",
    "SampleAPIConfig",
    "SampleAPIProcess",
    "main",
    "pattern_bytes",
    "pattern_sha256",
    "serve",
    "start_in_thread",
    "start_server",
    "start_subprocess",
]

CHUNK_SIZE: Final = 64 * 1024
SMALL_SIZE: Final = 1024
SERVER_NAME: Final = "backhaul-sampleapi"
MAX_HEAD: Final = 64 * 1024
MAX_HEADERS: Final = 200
IDLE_TIMEOUT: Final = 300.0
MAX_SLOW_SECONDS: Final = 3600.0
MAX_DRIP_CHUNKS: Final = 100_000
MAX_ECHO_BODY_TEXT: Final = 16 * 1024
WRITE_HIGH_WATER: Final = 512 * 1024

# The deterministic content: byte i of any body is ``i % 256``.
_BLOCK: Final = bytes(range(256)) * (CHUNK_SIZE // 256)
_SMALL_BODY: Final = _BLOCK[:SMALL_SIZE]
_REASONS: Final = {s.value: s.phrase for s in HTTPStatus}
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_TOKEN: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_NO_BODY_STATUS: Final = frozenset({204, 304})


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """The first ``n`` bytes (from ``offset``) of the content served by ``/bytes/{n}``."""
    if n <= 0:
        return b""
    start = offset % 256
    reps = (start + n) // len(_BLOCK) + 1
    return (_BLOCK * reps)[start : start + n]


def pattern_sha256(n: int) -> str:
    """SHA-256 (hex) of the body of ``GET /bytes/{n}``, computed without holding it all."""
    h = hashlib.sha256()
    full, rest = divmod(n, CHUNK_SIZE)
    for _ in range(full):
        h.update(_BLOCK)
    h.update(_BLOCK[:rest])
    return h.hexdigest()


@dataclass(frozen=True)
class SampleAPIConfig:
    """What the server checks: Basic credentials and an API key (both optional)."""

    basic: tuple[str, str] | None = None
    api_key: tuple[str, str] | None = None


# --------------------------------------------------------------------------------------
# HTTP/1.1 plumbing


class _BadRequest(Exception):
    def __init__(self, status: int = 400, message: str = "malformed request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    pass


_date_cache: list[Any] = [0, b""]


def _http_date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode("ascii")
    value: bytes = _date_cache[1]
    return value


class _Body:
    """The request body, read incrementally (Content-Length or chunked)."""

    __slots__ = ("_chunked", "_continue", "_left", "_need_crlf", "_reader", "_writer", "done")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        length: int,
        chunked: bool,
        expect_continue: bool,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._chunked = chunked
        self._left = 0 if chunked else length
        self._need_crlf = False
        self._continue = expect_continue and (chunked or length > 0)
        self.done = not chunked and length == 0

    @property
    def continue_pending(self) -> bool:
        """The client waits for ``100 Continue`` and nothing of the body was read yet."""
        return self._continue

    async def read(self) -> bytes:
        """The next piece of the body; ``b""`` at its end."""
        if self.done:
            return b""
        if self._continue:
            self._continue = False
            self._writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await self._writer.drain()
        try:
            if not self._chunked:
                data = await self._reader.read(min(self._left, CHUNK_SIZE))
                if not data:
                    raise _ClientGone
                self._left -= len(data)
                if self._left == 0:
                    self.done = True
                return data
            while self._left == 0:
                if self._need_crlf:
                    if await self._reader.readexactly(2) != b"\r\n":
                        raise _BadRequest(400, "chunk not followed by CRLF")
                    self._need_crlf = False
                line = await self._reader.readuntil(b"\r\n")
                size_text = line[:-2].split(b";", 1)[0].strip(b" \t")
                if not size_text or len(size_text) > 16 or not _HEX.issuperset(size_text):
                    raise _BadRequest(400, "bad chunk size")
                size = int(size_text, 16)
                if size == 0:
                    while await self._reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailer fields are read and ignored
                    self.done = True
                    return b""
                self._left = size
                self._need_crlf = True
            data = await self._reader.read(min(self._left, CHUNK_SIZE))
            if not data:
                raise _ClientGone
            self._left -= len(data)
            return data
        except asyncio.IncompleteReadError as exc:
            raise _ClientGone from exc
        except asyncio.LimitOverrunError as exc:
            raise _BadRequest(400, "chunk line too long") from exc

    async def discard(self) -> int:
        n = 0
        while chunk := await self.read():
            n += len(chunk)
        return n


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: list[tuple[str, str]]
    body: _Body

    def header(self, name: str) -> str | None:
        """A header's value (several fields of the same name joined with ', ')."""
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None


@dataclass(slots=True)
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None
    length: int | None = None  # for streams: the Content-Length, if known


def _json(status: int, obj: object, headers: Sequence[tuple[str, str]] = ()) -> _Response:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _Response(status, [("Content-Type", "application/json"), *headers], body)


def _problem(status: int, detail: str, headers: Sequence[tuple[str, str]] = ()) -> _Response:
    body = json.dumps(
        {
            "type": "about:blank",
            "title": _REASONS.get(status, ""),
            "status": status,
            "detail": detail,
        }
    ).encode()
    return _Response(status, [("Content-Type", "application/problem+json"), *headers], body)


def _parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _BadRequest(400, "bad request line")
    method_b, target_b, version_b = parts
    if not _TOKEN.issuperset(method_b):
        raise _BadRequest(400, "bad method")
    if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version_b.startswith(b"HTTP/"):
            raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise _BadRequest(400, "bad request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise _BadRequest(431, "too many header fields")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not _TOKEN.issuperset(name):
            raise _BadRequest(400, "bad header field")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    try:
        target = target_b.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _BadRequest(400, "bad request target") from exc
    return method_b.decode("ascii"), target, version_b.decode("ascii"), headers


def _body_framing(headers: list[tuple[str, str]]) -> tuple[int, bool]:
    te = [v for k, v in headers if k == "transfer-encoding"]
    cl = [v for k, v in headers if k == "content-length"]
    if te:
        if cl:
            raise _BadRequest(400, "both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for c in ",".join(te).split(",") if c.strip()]
        if not codings or codings[-1] != "chunked":
            raise _BadRequest(400, "chunked must be the final transfer coding")
        if len(codings) > 1:
            raise _BadRequest(501, "unsupported transfer coding")
        return 0, True
    if cl:
        values = {v.strip() for field in cl for v in field.split(",")}
        if len(values) != 1:
            raise _BadRequest(400, "conflicting Content-Length")
        value = values.pop()
        if not value.isdigit() or not value.isascii() or len(value) > 18:
            raise _BadRequest(400, "bad Content-Length")
        return int(value), False
    return 0, False


class _Server:
    def __init__(self, config: SampleAPIConfig) -> None:
        self.config = config
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        transport = writer.transport
        with contextlib.suppress(Exception):
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        try:
            await self._serve_connection(reader, writer)
        except (_ClientGone, ConnectionError, asyncio.IncompleteReadError):
            transport.abort()
        except asyncio.CancelledError:
            transport.abort()
            raise
        finally:
            self.writers.discard(writer)
            if not transport.is_closing():
                transport.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, TimeoutError):
                return  # the client closed between requests (or idled out)
            except asyncio.LimitOverrunError:
                await self._send_error(reader, writer, _BadRequest(431, "request head too large"))
                return
            head = head.lstrip(b"\r\n")[:-4] if head.startswith(b"\r\n") else head[:-4]
            if not head:
                continue
            try:
                method, target, version, headers = _parse_head(head)
                length, chunked = _body_framing(headers)
            except _BadRequest as exc:
                await self._send_error(reader, writer, exc)
                return
            conn_tokens = {
                t.strip().lower() for k, v in headers if k == "connection" for t in v.split(",")
            }
            if version == "HTTP/1.1":
                keep_alive = "close" not in conn_tokens
            else:
                keep_alive = "keep-alive" in conn_tokens
            expect = any(k == "expect" and v.lower() == "100-continue" for k, v in headers)
            body = _Body(reader, writer, length, chunked, expect and version == "HTTP/1.1")
            path, _, query = target.partition("?")
            if not path.startswith("/"):
                # absolute-form (http://host/path) or asterisk-form
                scheme_end = path.find("://")
                if scheme_end < 0:
                    await self._send_error(reader, writer, _BadRequest(400, "bad request target"))
                    return
                slash = path.find("/", scheme_end + 3)
                path = path[slash:] if slash >= 0 else "/"
            request = _Request(method, target, path, query, version, headers, body)
            try:
                response = await self._dispatch(request)
            except _BadRequest as exc:
                if not body.done:
                    keep_alive = False
                response = _problem(exc.status, exc.message)
            except (_ClientGone, ConnectionError):
                raise
            except Exception as exc:
                print(f"sample API: {method} {path}: {exc!r}", file=sys.stderr)
                keep_alive = False
                response = _problem(500, "internal error")
            if body.continue_pending:
                # Answered without reading the body the client holds back: the body must not
                # be requested after a final response, so this connection ends here.
                keep_alive = False
            keep_alive = await self._send(writer, request, response, keep_alive)
            if not keep_alive:
                if body.done:
                    with contextlib.suppress(Exception):
                        await writer.drain()
                else:
                    await _linger(reader, writer)
                return
            if not body.done:
                try:
                    await body.discard()
                except _BadRequest:
                    return

    async def _send_error(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exc: _BadRequest
    ) -> None:
        response = _problem(exc.status, exc.message)
        writer.write(self._head(response.status, response.headers, len(response.body), False))
        writer.write(response.body)
        await _linger(reader, writer)

    @staticmethod
    def _head(
        status: int,
        headers: list[tuple[str, str]],
        length: int | None,
        keep_alive: bool,
        chunked: bool = False,
    ) -> bytes:
        out = [
            b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n"
            % (status, _REASONS.get(status, "").encode(), SERVER_NAME.encode(), _http_date())
        ]
        for name, value in headers:
            out.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if length is not None:
            out.append(b"Content-Length: %d\r\n" % length)
        elif chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        out.append(
            b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n"
        )
        return b"".join(out)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        request: _Request,
        response: _Response,
        keep_alive: bool,
    ) -> bool:
        """Write the response; return whether the connection can carry another request."""
        head_only = request.method == "HEAD" or response.status in _NO_BODY_STATUS
        stream = response.stream
        if stream is None:
            length: int | None = len(response.body)
            if response.status in _NO_BODY_STATUS:
                length = None
            head = self._head(response.status, response.headers, length, keep_alive)
            writer.write(head if head_only else head + response.body)
            await writer.drain()
            return keep_alive
        chunked = response.length is None and request.version == "HTTP/1.1"
        if response.length is None and not chunked:
            keep_alive = False  # HTTP/1.0 client: the body ends when the connection closes
        writer.write(
            self._head(response.status, response.headers, response.length, keep_alive, chunked)
        )
        if head_only:
            await writer.drain()
            with contextlib.suppress(Exception):
                await stream.aclose()
            return keep_alive
        try:
            async for chunk in stream:
                if not chunk:
                    continue
                if chunked:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    writer.write(chunk)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, _ClientGone):
            raise
        except Exception as exc:
            # The head is out: the only honest signal left is to cut the connection.
            raise _ClientGone from exc
        return keep_alive

    # ----------------------------------------------------------------------------------
    # The endpoints

    async def _dispatch(self, req: _Request) -> _Response:
        path = req.path
        method = req.method
        get_like = method in ("GET", "HEAD")
        if path == "/small":
            if not get_like:
                return _not_allowed("GET, HEAD")
            return _Response(200, [("Content-Type", "application/octet-stream")], _SMALL_BODY)
        if path == "/hello":
            if not get_like:
                return _not_allowed("GET, HEAD")
            return _json(200, {"message": "hello from the sample API", "server": SERVER_NAME})
        segments = path.split("/")  # ["", "first", ...]
        first = segments[1] if len(segments) > 1 else ""
        if first == "echo":
            return await self._echo(req)
        if first == "upload" and len(segments) == 2:
            if method not in ("POST", "PUT"):
                return _not_allowed("POST, PUT")
            return await self._upload(req)
        if first == "slow" and len(segments) == 3:  # any method: a request held in flight
            seconds = _float_segment(segments[2], 0.0, MAX_SLOW_SECONDS)
            await req.body.discard()
            await asyncio.sleep(seconds)
            return _json(200, {"slept": seconds})
        if not get_like:
            if first in ("bytes", "basic", "apikey", "drip", "status", "hello"):
                return _not_allowed("GET, HEAD")
            return _problem(404, f"no such endpoint: {path}")
        if first == "bytes" and len(segments) == 3:
            n = _int_segment(segments[2], 0, 1 << 50)
            return _Response(
                200, [("Content-Type", "application/octet-stream")], stream=_blocks(n), length=n
            )
        if first == "basic":
            return self._basic(req)
        if first == "apikey":
            return self._apikey(req)
        if first == "drip" and len(segments) == 4:
            n = _int_segment(segments[2], 0, MAX_DRIP_CHUNKS)
            interval = _int_segment(segments[3], 0, 60_000) / 1000.0
            return _Response(200, [("Content-Type", "text/plain")], stream=_drip(n, interval))
        if first == "status" and len(segments) == 3:
            code = _int_segment(segments[2], 200, 599)
            if code in _NO_BODY_STATUS:
                return _Response(code, [])
            extra: list[tuple[str, str]] = []
            if code == 401:
                extra.append(("WWW-Authenticate", 'Basic realm="sample"'))
            elif code in (301, 302, 303, 307, 308):
                extra.append(("Location", "/hello"))
            elif code in (429, 503):
                extra.append(("Retry-After", "1"))
            return _json(code, {"status": code}, extra)
        return _problem(404, f"no such endpoint: {path}")

    async def _echo(self, req: _Request) -> _Response:
        digest = hashlib.sha256()
        n = 0
        text_parts: list[bytes] = []
        while chunk := await req.body.read():
            digest.update(chunk)
            if n < MAX_ECHO_BODY_TEXT:
                text_parts.append(chunk)
            n += len(chunk)
        body_text: str | None = None
        if n <= MAX_ECHO_BODY_TEXT:
            try:
                body_text = b"".join(text_parts).decode("utf-8")
            except UnicodeDecodeError:
                body_text = None
        headers: dict[str, str] = {}
        for name, value in req.headers:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        args: dict[str, list[str]] = {}
        for key, value in parse_qsl(req.query, keep_blank_values=True):
            args.setdefault(key, []).append(value)
        return _json(
            200,
            {
                "method": req.method,
                "path": req.path,
                "query": req.query,
                "args": args,
                "headers": headers,
                "body_bytes": n,
                "body_sha256": digest.hexdigest(),
                "body": body_text,
            },
        )

    async def _upload(self, req: _Request) -> _Response:
        digest = hashlib.sha256()
        n = 0
        while chunk := await req.body.read():
            digest.update(chunk)
            n += len(chunk)
        return _json(200, {"bytes": n, "sha256": digest.hexdigest()})

    def _basic(self, req: _Request) -> _Response:
        challenge = [("WWW-Authenticate", 'Basic realm="sample"')]
        expected = self.config.basic
        value = req.header("authorization") or ""
        scheme, _, token = value.partition(" ")
        if expected is None or scheme.lower() != "basic":
            return _problem(401, "Basic credentials required", challenge)
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return _problem(401, "malformed Basic credentials", challenge)
        user, sep, password = decoded.partition(":")
        ok_user = hmac.compare_digest(user.encode(), expected[0].encode())
        ok_pass = hmac.compare_digest(password.encode(), expected[1].encode())
        if not (sep and ok_user and ok_pass):
            return _problem(401, "wrong Basic credentials", challenge)
        return _json(
            200, {"authenticated": True, "scheme": "basic", "user": user, "path": req.path}
        )

    def _apikey(self, req: _Request) -> _Response:
        expected = self.config.api_key
        if expected is None:
            return _problem(401, "API key required")
        name, secret = expected
        header_value = req.header(name.lower())
        if header_value is not None and hmac.compare_digest(header_value.encode(), secret.encode()):
            return _json(200, {"authenticated": True, "via": "header", "path": req.path})
        for key, value in parse_qsl(req.query, keep_blank_values=True):
            if key == name and hmac.compare_digest(value.encode(), secret.encode()):
                return _json(200, {"authenticated": True, "via": "query", "path": req.path})
        return _problem(401, f"API key required in header or query parameter {name!r}")


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close after a final response, then read and drop what the client still sends.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the
    response before the client has read it.
    """
    with contextlib.suppress(Exception):
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(2.0):
            while await reader.read(CHUNK_SIZE):
                pass


def _not_allowed(allow: str) -> _Response:
    return _problem(405, "method not allowed", [("Allow", allow)])


def _int_segment(text: str, low: int, high: int) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise _BadRequest(400, f"not a non-negative integer: {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise _BadRequest(400, f"{value} is out of range [{low}, {high}]")
    return value


def _float_segment(text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise _BadRequest(400, f"not a number: {text!r}") from exc
    if not low <= value <= high:  # also rejects NaN
        raise _BadRequest(400, f"{text} is out of range [{low}, {high}]")
    return value


async def _blocks(n: int) -> AsyncGenerator[bytes, None]:
    full, rest = divmod(n, CHUNK_SIZE)
    block = _BLOCK
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


async def _drip(n: int, interval: float) -> AsyncGenerator[bytes, None]:
    for i in range(n):
        if i:
            await asyncio.sleep(interval)
        yield b"chunk %d\n" % i


# --------------------------------------------------------------------------------------
# Running it


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _write_ready_file(path: str | os.PathLike[str], host: str, port: int) -> None:
    target = Path(path)
    info = {"host": host, "port": port, "url": _url(host, port), "pid": os.getpid()}
    fd, tmp = tempfile.mkstemp(prefix=".ready-", dir=target.parent or ".")
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    os.replace(tmp, target)


async def start_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    basic: tuple[str, str] | None = None,
    api_key: tuple[str, str] | None = None,
) -> asyncio.Server:
    """Start listening in the running event loop (port: ``server.sockets[0].getsockname()[1]``).

    Closing the returned server stops accepting; open connections end with the loop.
    """
    server, _ = await _listen(host, port, basic, api_key)
    return server


async def _listen(
    host: str, port: int, basic: tuple[str, str] | None, api_key: tuple[str, str] | None
) -> tuple[asyncio.Server, _Server]:
    state = _Server(SampleAPIConfig(basic=basic, api_key=api_key))
    server = await asyncio.start_server(state.handle, host, port, limit=MAX_HEAD, backlog=1024)
    return server, state


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    basic: tuple[str, str] | None = None,
    api_key: tuple[str, str] | None = None,
    ready_file: str | os.PathLike[str] | None = None,
    on_ready: Callable[[str, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or the task is cancelled).

    Once listening, writes ``ready_file`` (JSON host/port/url/pid, atomically) and calls
    ``on_ready(host, port)`` with the actual port (useful with ``port=0``).
    """
    server, state = await _listen(host, port, basic, api_key)
    bound_port = int(server.sockets[0].getsockname()[1])
    try:
        if ready_file is not None:
            _write_ready_file(ready_file, host, bound_port)
        if on_ready is not None:
            on_ready(host, bound_port)
        if stop is None:
            await asyncio.Future()  # forever
        else:
            await stop.wait()
    finally:
        server.close()
        for writer in list(state.writers):
            writer.transport.abort()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        if ready_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(ready_file)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


class RunningServer:
    """A sample API served from a background thread of this process (see start_in_thread)."""

    def __init__(
        self,
        host: str,
        port: int,
        thread: threading.Thread,
        loop: asyncio.AbstractEventLoop,
        stop_event: asyncio.Event,
    ) -> None:
        self.host = host
        self.port = port
        self.url = _url(host, port)
        self._thread = thread
        self._loop = loop
        self._stop_event = stop_event

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    basic: tuple[str, str] | None = None,
    api_key: tuple[str, str] | None = None,
    timeout: float = 10.0,
) -> RunningServer:
    """Serve from a daemon thread with its own event loop; returns once it listens.

    ``with start_in_thread() as api: httpx.get(api.url + "/hello")``
    """
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def run() -> None:
        stop_event = asyncio.Event()
        box["loop"] = asyncio.get_running_loop()
        box["stop"] = stop_event

        def on_ready(h: str, p: int) -> None:
            box["port"] = p
            ready.set()

        await serve(host, port, basic=basic, api_key=api_key, on_ready=on_ready, stop=stop_event)

    def target() -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(run())
        except BaseException as exc:
            box["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=target, name="sampleapi", daemon=True)
    thread.start()
    if not ready.wait(timeout):
        raise TimeoutError("the sample API did not start in time")
    if "port" not in box:
        raise RuntimeError("the sample API failed to start") from box.get("error")
    return RunningServer(host, box["port"], thread, box["loop"], box["stop"])


class SampleAPIProcess:
    """A sample API running as a child process (see start_subprocess)."""

    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int) -> None:
        self.process = process
        self.pid = process.pid
        self.host = host
        self.port = port
        self.url = _url(host, port)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> SampleAPIProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_subprocess(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    basic: tuple[str, str] | None = None,
    api_key: tuple[str, str] | None = None,
    python: str = sys.executable,
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = None,
    start_new_session: bool = False,
) -> SampleAPIProcess:
    """Run ``python -m backhaul.sampleapi`` as a child; returns once it listens.

    With ``port=0`` the OS picks a free port; read it from ``.port`` / ``.url``.
    """
    argv = [python, "-m", "backhaul.sampleapi", "--host", host, "--port", str(port)]
    if basic is not None:
        argv += ["--basic", f"{basic[0]}:{basic[1]}"]
    if api_key is not None:
        argv += ["--api-key", f"{api_key[0]}={api_key[1]}"]
    with tempfile.TemporaryDirectory(prefix="sampleapi-") as tmp:
        ready_file = Path(tmp) / "ready.json"
        argv += ["--ready-file", str(ready_file)]
        process = subprocess.Popen(  # noqa: S603 - fixed argv
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=start_new_session,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ready_file.exists():
                if process.poll() is not None:
                    raise RuntimeError(f"the sample API exited with status {process.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the sample API did not start in time")
                time.sleep(0.02)
            info = json.loads(ready_file.read_text())
        except BaseException:
            if process.poll() is None:
                process.kill()
                process.wait()
            raise
    return SampleAPIProcess(process, host, int(info["port"]))


def _pair(text: str, sep: str, what: str) -> tuple[str, str]:
    left, found, right = text.partition(sep)
    if not found or not left:
        raise argparse.ArgumentTypeError(f"expected {what}")
    return left, right


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backhaul.sampleapi", description="Sample internal HTTP API."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--basic",
        metavar="USER:PASS",
        type=lambda s: _pair(s, ":", "USER:PASS"),
        help="Basic credentials accepted on /basic/...",
    )
    parser.add_argument(
        "--api-key",
        metavar="NAME=VALUE",
        type=lambda s: _pair(s, "=", "NAME=VALUE"),
        help="API key accepted on /apikey/... in header NAME or query parameter NAME",
    )
    parser.add_argument(
        "--ready-file",
        metavar="PATH",
        help="write {host, port, url, pid} as JSON here once listening",
    )
    args = parser.parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)

        def on_ready(host: str, port: int) -> None:
            print(f"sample API listening on {_url(host, port)}", flush=True)

        await serve(
            args.host,
            args.port,
            basic=args.basic,
            api_key=args.api_key,
            ready_file=args.ready_file,
            on_ready=on_ready,
            stop=stop,
        )

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
