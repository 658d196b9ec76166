"""relay.locations: an API's own URLs in Location and Content-Location, as the caller sees them."""

from __future__ import annotations

import pytest

from relay.headers import raw_response_headers
from relay.locations import invoke_prefix, public_location

BASE = "http://orders.corp.local:8080/api/"
UPSTREAM = "http://orders.corp.local:8080/api/orders?top=5"
PREFIX = "/v1/connections/cxn_1/invoke"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Absolute URLs under the base URL: the internal host never reaches the caller.
        ("http://orders.corp.local:8080/api/orders/42", PREFIX + "/orders/42"),
        ("HTTP://Orders.Corp.Local:8080/api/orders/42", PREFIX + "/orders/42"),
        ("http://orders.corp.local:8080/api/", PREFIX + "/"),
        ("http://orders.corp.local:8080/api", PREFIX + "/"),
        ("http://orders.corp.local:8080/api/a?b=1#c", PREFIX + "/a?b=1#c"),
        # References relative to the request's URL.
        ("/api/orders/42", PREFIX + "/orders/42"),
        ("42", PREFIX + "/42"),
        ("../api/x", PREFIX + "/x"),
        ("?page=2", PREFIX + "/orders?page=2"),
        ("//orders.corp.local:8080/api/x", PREFIX + "/x"),
        # Not under the base URL: passed on as they are.
        ("/other/x", "/other/x"),
        ("/apix/orders", "/apix/orders"),
        ("http://orders.corp.local:8081/api/x", "http://orders.corp.local:8081/api/x"),
        ("https://orders.corp.local:8080/api/x", "https://orders.corp.local:8080/api/x"),
        ("https://login.example.com/authorize", "https://login.example.com/authorize"),
        ("http://user@orders.corp.local:8080/api/x", "http://user@orders.corp.local:8080/api/x"),
        ("mailto:ops@example.com", "mailto:ops@example.com"),
        ("http://[::1", "http://[::1"),
        ("http://orders.corp.local:99999/api/x", "http://orders.corp.local:99999/api/x"),
        ("", ""),
    ],
)
def test_references_under_the_base_url_move_to_the_invoke_path(value: str, expected: str) -> None:
    assert public_location(value, UPSTREAM, BASE, PREFIX) == expected


def test_default_ports_are_the_same_origin() -> None:
    base = "https://api.corp.local/v2/"
    assert public_location("https://api.corp.local:443/v2/x", base, base, PREFIX) == PREFIX + "/x"
    assert public_location("http://h:80/x", "http://h/", "http://h/", PREFIX) == PREFIX + "/x"


def test_the_requests_query_is_never_copied_into_the_answer() -> None:
    """An API key may travel in the request's query string: a fragment-only or empty
    reference must not bring it back to the caller."""
    upstream = "http://orders.corp.local:8080/api/orders?api_key=s3cret"
    assert public_location("#top", upstream, BASE, PREFIX) == PREFIX + "/orders#top"
    assert "s3cret" not in public_location(".", upstream, BASE, PREFIX)


def test_a_value_with_controls_is_left_for_the_header_check_to_refuse() -> None:
    value = "/api/x\r\nset-cookie: a=1"
    assert public_location(value, UPSTREAM, BASE, PREFIX) == value


def test_the_prefix_keeps_the_root_path() -> None:
    assert invoke_prefix("/gw", "cxn_1") == "/gw/v1/connections/cxn_1/invoke"


def test_only_location_fields_are_translated() -> None:
    pairs = [
        ("Location", "/api/orders/42"),
        ("Content-Location", "http://orders.corp.local:8080/api/orders/42"),
        ("Link", "</api/orders/43>; rel=next"),
    ]
    relocated = raw_response_headers(
        pairs, relocate=lambda v: public_location(v, UPSTREAM, BASE, PREFIX)
    )
    assert relocated == [
        (b"location", (PREFIX + "/orders/42").encode()),
        (b"content-location", (PREFIX + "/orders/42").encode()),
        (b"link", b"</api/orders/43>; rel=next"),
    ]
    assert raw_response_headers(pairs)[0] == (b"location", b"/api/orders/42")
