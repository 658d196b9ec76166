"""The relay's direct invoke path (relay/edge.py) over a raw TLS connection: what httpx does
not send — pipelined requests, ``Expect: 100-continue`` — through real relay and agent
processes."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import time

import pytest

from tests.e2e.conftest import World

pytestmark = pytest.mark.e2e


def _connect(world: World) -> ssl.SSLSocket:
    host, port = world.stack.relay_url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=str(world.stack.ca_file))
    raw = socket.create_connection((host, int(port)), timeout=30)
    return ctx.wrap_socket(raw, server_hostname=host)


def _read_response(sock: ssl.SSLSocket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length response off ``sock``; what follows it stays in ``buffer``."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response head"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a body"
        rest += chunk
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def test_pipelined_requests_are_answered_in_order(world: World) -> None:
    base = f"/v1/connections/{world.none_id}/invoke"
    auth = f"Authorization: Bearer {world.stack.admin_token}\r\n"
    requests = b"".join(
        f"GET {base}/echo/{i} HTTP/1.1\r\nHost: relay\r\n{auth}\r\n".encode() for i in range(5)
    )
    with _connect(world) as sock:
        sock.sendall(requests)  # all five before reading any answer
        buffer = bytearray()
        for i in range(5):
            status, _, body = _read_response(sock, buffer)
            assert status == 200
            assert json.loads(body)["path"] == f"/echo/{i}"


def test_an_answer_through_the_tunnel_has_one_date_field(world: World) -> None:
    """The sample API dates its answers and the relay's server would date them too: the
    caller gets exactly one Date (a singleton field, RFC 9110 §6.6.1)."""
    base = f"/v1/connections/{world.none_id}/invoke"
    auth = f"Authorization: Bearer {world.stack.admin_token}\r\n"
    with _connect(world) as sock:
        sock.sendall(f"GET {base}/small HTTP/1.1\r\nHost: relay\r\n{auth}\r\n".encode())
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk
            buffer += chunk
    head = bytes(buffer).partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200")
    assert head.count(b"\r\ndate:") == 1


def test_pipelined_uploads_each_reach_the_api_whole(world: World) -> None:
    # The later requests' bodies arrive while the first is answered: they wait in uvicorn's
    # buffer until their turn, then the direct path takes them over.
    base = f"/v1/connections/{world.none_id}/invoke"
    bodies = [bytes([65 + i]) * size for i, size in enumerate((300_000, 10, 700_000, 0))]
    requests = b"".join(
        f"POST {base}/echo/{i} HTTP/1.1\r\nHost: relay\r\n"
        f"Authorization: Bearer {world.stack.admin_token}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        for i, body in enumerate(bodies)
    )
    with _connect(world) as sock:
        sock.sendall(requests)
        buffer = bytearray()
        for i, body in enumerate(bodies):
            status, _, answer = _read_response(sock, buffer)
            assert status == 200
            doc = json.loads(answer)
            assert doc["path"] == f"/echo/{i}"
            assert doc["body_bytes"] == len(body)
            assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_expect_100_continue_gets_its_interim_answer_then_the_body_passes(world: World) -> None:
    body = b"0123456789" * 100
    head = (
        f"PUT /v1/connections/{world.none_id}/invoke/echo/expect HTTP/1.1\r\n"
        f"Host: relay\r\nAuthorization: Bearer {world.stack.admin_token}\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with _connect(world) as sock:
        sock.sendall(head)
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(65536)
        interim, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        buffer[:] = rest
        sock.sendall(body)
        status, _, answer = _read_response(sock, buffer)
    assert status == 200
    doc = json.loads(answer)
    assert (doc["method"], doc["body_bytes"]) == ("PUT", len(body))


def test_a_refused_request_keeps_the_connection_usable(world: World) -> None:
    """A 404 problem from the relay, then a good request on the same connection."""
    auth = f"Authorization: Bearer {world.stack.admin_token}\r\n"
    with _connect(world) as sock:
        buffer = bytearray()
        sock.sendall(
            f"GET /v1/connections/cxn_nosuchconnection0000/invoke/x HTTP/1.1\r\n"
            f"Host: relay\r\n{auth}\r\n".encode()
        )
        status, headers, _ = _read_response(sock, buffer)
        assert status == 404 and headers["content-type"].startswith("application/problem+json")
        sock.sendall(
            f"GET /v1/connections/{world.none_id}/invoke/small HTTP/1.1\r\n"
            f"Host: relay\r\n{auth}\r\n".encode()
        )
        status, _, body = _read_response(sock, buffer)
        assert status == 200 and len(body) == 1024


def test_a_caller_gone_mid_upload_frees_its_stream_and_the_rest_goes_on(world: World) -> None:
    """The direct path's body reader sees the hang-up: the stream is reset, the agent gives up
    the API call, and the relay goes on serving."""
    head = (
        f"POST /v1/connections/{world.none_id}/invoke/upload HTTP/1.1\r\n"
        f"Host: relay\r\nAuthorization: Bearer {world.stack.admin_token}\r\n"
        f"Content-Length: {64 * 1024 * 1024}\r\n\r\n"
    ).encode()
    with _connect(world) as sock:
        sock.sendall(head)
        sock.sendall(b"u" * (1024 * 1024))  # a sixty-fourth of it, then gone
        time.sleep(0.3)
    deadline = time.monotonic() + 15
    while "invoke.upload_aborted" not in world.stack.log_text("relay"):
        assert time.monotonic() < deadline, "the relay never saw the caller go"
        time.sleep(0.2)
    while world.stack.agent_status(world.agent_dir).get("inflight") != 0:
        assert time.monotonic() < deadline, "the agent kept the abandoned stream"
        time.sleep(0.2)
    with _connect(world) as sock:
        sock.sendall(
            f"GET /v1/connections/{world.none_id}/invoke/small HTTP/1.1\r\n"
            f"Host: relay\r\nAuthorization: Bearer {world.stack.admin_token}\r\n\r\n".encode()
        )
        status, _, body = _read_response(sock, bytearray())
    assert status == 200 and len(body) == 1024
