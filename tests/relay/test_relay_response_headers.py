"""relay.headers: what of the internal API's response headers reaches the caller, and how the
caller's request fields are read."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from relay.headers import (
    bearer_token,
    has_request_header,
    raw_response_headers,
    request_header,
    request_header_items,
    response_headers,
)
from relay.invoke import AsgiSink

PAIRS = [
    ("Content-Type", "application/json"),
    ("Set-Cookie", "a=1"),
    ("Connection", "keep-alive"),
    ("Set-Cookie", "b=2"),
    ("Transfer-Encoding", "chunked"),
    ("X-Note", "caf\u00e9"),
]


def test_raw_headers_drop_hop_by_hop_and_keep_repeated_fields() -> None:
    assert raw_response_headers(PAIRS) == [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-note", "caf\u00e9".encode("latin-1")),
    ]


def test_raw_headers_match_the_mutable_headers_form() -> None:
    assert raw_response_headers(PAIRS) == response_headers(PAIRS).raw
    drop = frozenset({"x-note"})
    assert raw_response_headers(PAIRS, drop) == response_headers(PAIRS, drop).raw


async def test_the_asgi_path_leaves_date_to_the_server() -> None:
    """uvicorn writes its own Date in front of an ASGI answer's headers: the API's is left
    out there, so the caller gets one Date field, not two."""
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [(b"date", b"Thu, 03 Dec 2026 09:59:59 GMT"), (b"content-length", b"2")]
    await AsgiSink(send).start(200, headers)
    assert sent == [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    ]


# ---------------------------------------------------------------------- the request's fields

_NAMES = st.sampled_from([b"content-length", b"authorization", b"x-backhaul-timeout", b"x-a"])
_FIELDS = st.lists(st.tuples(_NAMES, st.binary(max_size=8).map(lambda v: v.replace(b"\n", b""))))


@settings(max_examples=300, deadline=None)
@given(fields=_FIELDS, name=_NAMES)
def test_request_fields_read_as_starlettes_headers_read_them(
    fields: list[tuple[bytes, bytes]], name: bytes
) -> None:
    """The invoke path reads the caller's fields from the scope; Starlette's ``Headers`` over
    the same scope is what it used to ask, and must agree on every answer."""
    scope: dict[str, Any] = {"type": "http", "headers": fields}
    headers = Headers(scope=scope)
    key = name.decode()
    assert request_header(scope, name) == headers.get(key)
    assert has_request_header(scope, name) is (key in headers)
    assert request_header_items(scope) == headers.items()


def test_bearer_token_is_the_first_authorization_fields_when_its_scheme_is_bearer() -> None:
    def token(*fields: tuple[bytes, bytes]) -> str | None:
        return bearer_token({"headers": list(fields)})

    assert token((b"authorization", b"Bearer bh_abc")) == "bh_abc"
    assert token((b"authorization", b"bearer  bh_abc ")) == "bh_abc"
    assert token((b"authorization", b"Bearer")) == ""
    assert token((b"authorization", b"Basic YTpi")) is None
    assert token((b"x-a", b"Bearer bh_abc")) is None
    assert token((b"authorization", b"Basic YTpi"), (b"authorization", b"Bearer bh_abc")) is None
