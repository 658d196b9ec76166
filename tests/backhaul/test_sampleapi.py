"""The sample internal API: endpoints, HTTP/1.1 framing, and the ways to start it."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from backhaul import sampleapi
from backhaul.sampleapi import pattern_bytes, pattern_sha256

BASIC = ("alice", "s3cret:with-colon")
API_KEY = ("X-Api-Key", "k-123")


@pytest.fixture(scope="module")
def api() -> Iterator[sampleapi.RunningServer]:
    with sampleapi.start_in_thread(basic=BASIC, api_key=API_KEY) as server:
        yield server


@pytest.fixture
def client(api: sampleapi.RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=10) as c:
        yield c


def raw_exchange(api: sampleapi.RunningServer, data: bytes, *, until_close: bool = True) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or 2 s of quiet)."""
    with socket.create_connection((api.host, api.port), timeout=2) as sock:
        sock.sendall(data)
        if not until_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


# --- content ---------------------------------------------------------------------------


def test_pattern_helpers() -> None:
    data = pattern_bytes(200_000)
    assert len(data) == 200_000
    assert data[:4] == b"\x00\x01\x02\x03"
    assert data[256] == 0 and data[65537] == 1
    assert pattern_sha256(200_000) == hashlib.sha256(data).hexdigest()
    assert pattern_bytes(10, offset=254) == bytes([254, 255, 0, 1, 2, 3, 4, 5, 6, 7])
    assert pattern_bytes(0) == b""


def test_hello(client: httpx.Client) -> None:
    r = client.get("/hello")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert "hello" in r.json()["message"]


def test_small_is_exactly_1024_bytes(client: httpx.Client) -> None:
    r = client.get("/small")
    assert r.status_code == 200
    assert r.headers["content-length"] == "1024"
    assert r.content == pattern_bytes(1024)


@pytest.mark.parametrize("n", [0, 1, 65535, 65536, 65537, 3 * 65536 + 17, 5_000_000])
def test_bytes(client: httpx.Client, n: int) -> None:
    digest = hashlib.sha256()
    got = 0
    with client.stream("GET", f"/bytes/{n}") as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(n)
        for chunk in r.iter_raw():
            digest.update(chunk)
            got += len(chunk)
    assert got == n
    assert digest.hexdigest() == pattern_sha256(n)


def test_bytes_bad_size(client: httpx.Client) -> None:
    assert client.get("/bytes/abc").status_code == 400
    assert client.get("/bytes/-1").status_code == 400


def test_head_has_headers_but_no_body(client: httpx.Client) -> None:
    r = client.head("/bytes/1000000")
    assert r.status_code == 200
    assert r.headers["content-length"] == "1000000"
    assert r.content == b""
    # the connection is still usable afterwards
    assert client.get("/small").content == pattern_bytes(1024)


def test_head_raw_has_no_body(api: sampleapi.RunningServer) -> None:
    out = raw_exchange(api, b"HEAD /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Content-Length: 1024" in head
    assert body == b""


# --- uploads ---------------------------------------------------------------------------


def test_upload_content_length(client: httpx.Client) -> None:
    data = pattern_bytes(1_000_003)
    r = client.post("/upload", content=data)
    assert r.json() == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_upload_chunked_generator(client: httpx.Client) -> None:
    parts = [b"a" * 70_000, b"", b"b" * 3, b"c" * 200_000]

    def gen() -> Iterator[bytes]:
        yield from parts

    r = client.put("/upload", content=gen())
    body = b"".join(parts)
    assert r.json() == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_upload_empty(client: httpx.Client) -> None:
    r = client.post("/upload")
    assert r.json() == {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}


def test_upload_wrong_method(client: httpx.Client) -> None:
    r = client.get("/upload")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST, PUT"


def test_chunked_raw_with_extensions_and_trailers(api: sampleapi.RunningServer) -> None:
    req = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    out = raw_exchange(api, req)
    body = json.loads(out.partition(b"\r\n\r\n")[2])
    assert body == {"bytes": 11, "sha256": hashlib.sha256(b"hello world").hexdigest()}


def test_expect_100_continue(api: sampleapi.RunningServer) -> None:
    with socket.create_connection((api.host, api.port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = sock.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"data")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(out.partition(b"\r\n\r\n")[2])["bytes"] == 4


def test_expect_100_continue_refused_closes(api: sampleapi.RunningServer) -> None:
    with socket.create_connection((api.host, api.port), timeout=5) as sock:
        sock.sendall(
            b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 405 ")
    assert b"100 Continue" not in out
    assert b"Connection: close" in out


# --- echo ------------------------------------------------------------------------------


def test_echo(client: httpx.Client) -> None:
    r = client.request(
        "PATCH",
        "/echo/a/b%20c?x=1&x=2&y=",
        content=b'{"k": 1}',
        headers={"X-Custom": "Value", "Content-Type": "application/json"},
    )
    assert r.status_code == 200
    got = r.json()
    assert got["method"] == "PATCH"
    assert got["path"] == "/echo/a/b%20c"
    assert got["query"] == "x=1&x=2&y="
    assert got["args"] == {"x": ["1", "2"], "y": [""]}
    assert got["headers"]["x-custom"] == "Value"
    assert got["headers"]["content-type"] == "application/json"
    assert got["body_bytes"] == 8
    assert got["body_sha256"] == hashlib.sha256(b'{"k": 1}').hexdigest()
    assert got["body"] == '{"k": 1}'


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_echo_any_method(client: httpx.Client, method: str) -> None:
    r = client.request(method, "/echo")
    assert r.json()["method"] == method


def test_echo_repeated_header_joined(api: sampleapi.RunningServer) -> None:
    out = raw_exchange(
        api, b"GET /echo/h HTTP/1.1\r\nHost: x\r\nA: 1\r\nA: 2\r\nConnection: close\r\n\r\n"
    )
    assert json.loads(out.partition(b"\r\n\r\n")[2])["headers"]["a"] == "1, 2"


# --- authentication --------------------------------------------------------------------


def basic_header(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_basic_missing(client: httpx.Client) -> None:
    r = client.get("/basic/x")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Basic realm="sample"'


def test_basic_wrong(client: httpx.Client) -> None:
    assert client.get("/basic/x", headers=basic_header("alice", "nope")).status_code == 401
    assert client.get("/basic/x", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.get("/basic/x", headers={"Authorization": "Bearer x"}).status_code == 401


def test_basic_right(client: httpx.Client) -> None:
    r = client.get("/basic/deep/path", auth=BASIC)
    assert r.status_code == 200
    assert r.json() == {
        "authenticated": True,
        "scheme": "basic",
        "user": "alice",
        "path": "/basic/deep/path",
    }


def test_apikey(client: httpx.Client) -> None:
    assert client.get("/apikey/x").status_code == 401
    assert client.get("/apikey/x", headers={"X-Api-Key": "wrong"}).status_code == 401
    r = client.get("/apikey/x", headers={"x-api-key": "k-123"})
    assert r.status_code == 200 and r.json()["via"] == "header"
    r = client.get("/apikey/x", params={"X-Api-Key": "k-123"})
    assert r.status_code == 200 and r.json()["via"] == "query"
    assert client.get("/apikey/x", params={"X-Api-Key": "k"}).status_code == 401


def test_auth_endpoints_refuse_everything_when_not_configured() -> None:
    with sampleapi.start_in_thread() as bare, httpx.Client(base_url=bare.url) as c:
        assert c.get("/basic/x", auth=("a", "b")).status_code == 401
        assert c.get("/apikey/x", params={"X-Api-Key": "k-123"}).status_code == 401
        assert c.get("/hello").status_code == 200


# --- timing, streaming, status ---------------------------------------------------------


def test_slow(client: httpx.Client) -> None:
    start = time.monotonic()
    r = client.get("/slow/0.3")
    assert r.status_code == 200
    assert time.monotonic() - start >= 0.29
    assert r.json() == {"slept": 0.3}
    assert client.get("/slow/nan").status_code == 400
    assert client.get("/slow/-1").status_code == 400


def test_drip_streams(client: httpx.Client) -> None:
    arrivals: list[float] = []
    body = b""
    start = time.monotonic()
    with client.stream("GET", "/drip/4/150") as r:
        assert r.headers["transfer-encoding"] == "chunked"
        for chunk in r.iter_raw():
            arrivals.append(time.monotonic() - start)
            body += chunk
    assert body == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
    assert arrivals[0] < 0.3  # the first chunk comes before the rest
    assert arrivals[-1] >= 0.4


def test_drip_http10_is_close_delimited(api: sampleapi.RunningServer) -> None:
    out = raw_exchange(api, b"GET /drip/2/0 HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Connection: close" in head
    assert body == b"chunk 0\nchunk 1\n"


@pytest.mark.parametrize("code", [200, 201, 302, 400, 401, 403, 404, 418, 429, 500, 502, 503])
def test_status(client: httpx.Client, code: int) -> None:
    r = client.get(f"/status/{code}")
    assert r.status_code == code
    assert r.json() == {"status": code}


def test_status_without_body(client: httpx.Client) -> None:
    r = client.get("/status/204")
    assert r.status_code == 204 and r.content == b""
    r = client.get("/status/304")
    assert r.status_code == 304 and r.content == b""


def test_status_out_of_range(client: httpx.Client) -> None:
    assert client.get("/status/99").status_code == 400
    assert client.get("/status/600").status_code == 400


def test_unknown_path_and_method(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert client.post("/small").status_code == 405
    assert client.delete("/bytes/1").status_code == 405


# --- HTTP/1.1 connection handling -------------------------------------------------------


def test_keep_alive_reuses_one_connection(api: sampleapi.RunningServer) -> None:
    ports: set[int] = set()

    with httpx.Client(base_url=api.url) as c:
        for _ in range(20):
            r = c.get("/echo")
            assert r.status_code == 200
            ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1


def test_pipelining(api: sampleapi.RunningServer) -> None:
    req = b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_exchange(api, req * 3 + last)
    assert out.count(b"HTTP/1.1 200 OK\r\n") == 4
    assert out.endswith(b"}")


def test_unread_body_is_skipped_on_keep_alive(api: sampleapi.RunningServer) -> None:
    req = b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nxxxxx"
    last = b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_exchange(api, req + last)
    assert out.startswith(b"HTTP/1.1 405 ")
    assert b"HTTP/1.1 200 OK\r\n" in out


def test_http10_closes_by_default(api: sampleapi.RunningServer) -> None:
    out = raw_exchange(api, b"GET /hello HTTP/1.0\r\n\r\n", until_close=False)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in out


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"garbage\r\n\r\n", b"400"),
        (b"GET /hello HTTP/2.0\r\n\r\n", b"505"),
        (b"GET /hello HTTP/1.1\r\nBad Header\r\n\r\n", b"400"),
        (
            b"POST /upload HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"400",
        ),
        (b"POST /upload HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", b"400"),
        (b"POST /upload HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
        (b"POST /upload HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"400"),
        (b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"400"),
    ],
)
def test_malformed_requests(
    api: sampleapi.RunningServer, request_bytes: bytes, status: bytes
) -> None:
    out = raw_exchange(api, request_bytes, until_close=False)
    assert out.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"Connection: close" in out


def test_head_too_large(api: sampleapi.RunningServer) -> None:
    out = raw_exchange(api, b"GET /hello HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")


def test_absolute_form_target(api: sampleapi.RunningServer) -> None:
    out = raw_exchange(
        api, b"GET http://example/small HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert out.endswith(pattern_bytes(1024))


def test_many_concurrent_clients(api: sampleapi.RunningServer) -> None:
    import concurrent.futures

    def work(_: int) -> int:
        with httpx.Client(base_url=api.url) as c:
            return sum(len(c.get("/small").content) for _ in range(20))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert list(pool.map(work, range(16))) == [20 * 1024] * 16


# --- ways to start it ------------------------------------------------------------------


async def test_start_server_in_running_loop() -> None:
    server = await sampleapi.start_server("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{port}/hello")
            assert r.status_code == 200
    finally:
        server.close()


def test_start_subprocess() -> None:
    with sampleapi.start_subprocess(basic=("u", "p"), api_key=("K", "v")) as proc:
        assert proc.port > 0
        assert proc.url == f"http://127.0.0.1:{proc.port}"
        assert httpx.get(proc.url + "/basic/x", auth=("u", "p")).status_code == 200
        assert httpx.get(proc.url + "/apikey/x", headers={"K": "v"}).status_code == 200
    assert proc.process.returncode is not None


def test_cli_ready_file(tmp_path: object) -> None:
    from pathlib import Path

    ready = Path(str(tmp_path)) / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "backhaul.sampleapi", "--port", "0", "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid
        assert info["url"] == f"http://127.0.0.1:{info['port']}"
        assert httpx.get(info["url"] + "/hello").status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "listening on http://127.0.0.1:" in out
    assert not ready.exists()  # removed on a clean shutdown


def test_cli_rejects_bad_options() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "backhaul.sampleapi", "--basic", "nocolon"],
        capture_output=True,
        timeout=20,
    )
    assert r.returncode == 2
