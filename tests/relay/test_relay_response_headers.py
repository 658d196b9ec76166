"""relay.headers: what of the internal API's response headers reaches the caller."""

from __future__ import annotations

from relay.headers import raw_response_headers, response_headers

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
