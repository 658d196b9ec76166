from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import head as head_module
from agent.errors import BadRequestHead
from agent.head import AuthSpec, RequestHead


def head(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "method": "GET",
        "url": "http://127.0.0.1:8080/api/x?q=1",
        "headers": [["accept", "*/*"]],
        "connection_id": "cxn_1",
        "base_url": "http://127.0.0.1:8080/api/",
        "auth": {"type": "none", "api_key_name": None, "api_key_in": None},
        "suite": "MLKEM768_X25519/HKDF_SHA256/CHACHA20_POLY1305",
        "sealed": "AAAA",
        "timeout_ms": 30000,
    }
    doc.update(overrides)
    return doc


def test_parse_dict_and_json() -> None:
    parsed = RequestHead.parse(head())
    assert parsed.headers == (("accept", "*/*"),)
    assert parsed.timeout_seconds == 30
    assert RequestHead.parse(json.dumps(head()).encode()) == parsed
    assert RequestHead.parse({**head(), "auth": {"type": "basic"}}).auth.type == "basic"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"extra": 1}, "extra: unknown field"),
        ({"method": "GE T"}, "method"),
        ({"method": "GET\r\n"}, "method"),
        ({"method": ""}, "method"),
        ({"method": 1}, "method"),
        ({"url": 5}, "url"),
        ({"headers": [["bad name", "x"]]}, "headers"),
        ({"headers": [["x-a", "v\r\nInjected: 1"]]}, "headers"),
        ({"headers": [["x-a", "v\nx"]]}, "headers"),
        # A trailing newline is where ``$`` would match too: each must still be refused.
        ({"method": "GET\n"}, "method"),
        ({"headers": [["x-a\n", "v"]]}, "headers"),
        ({"headers": [["x-a", "v\n"]]}, "headers"),
        ({"auth": {"type": "api_key", "api_key_name": "k\n", "api_key_in": "header"}}, "auth"),
        ({"auth": {"type": "windows", "spn": "HTTP/api.corp.example\n"}}, "auth"),
        ({"headers": [["x-a", "v\x00"]]}, "headers"),
        ({"headers": [["x-a", "v\x7f"]]}, "headers"),
        ({"headers": [["x-a"]]}, "headers"),
        ({"headers": [["x-a", 1]]}, "headers"),
        ({"headers": {"x-a": "1"}}, "headers"),
        ({"headers": [["x", "y" * 70000]]}, "headers"),
        ({"connection_id": ""}, "connection_id"),
        ({"connection_id": "cxn/../1"}, "connection_id"),
        ({"auth": {"type": "ntlm"}}, "auth.type"),
        ({"auth": {"type": "api_key"}}, "auth"),
        ({"auth": {"type": "api_key", "api_key_name": "x y", "api_key_in": "header"}}, "auth"),
        ({"auth": {"type": "api_key", "api_key_name": "k", "api_key_in": "body"}}, "auth"),
        ({"auth": {"type": "none", "oops": 1}}, "auth.oops"),
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"timeout_ms": "100"}, "timeout_ms"),
        ({"timeout_ms": 1.5}, "timeout_ms"),
        ({"timeout_ms": True}, "timeout_ms"),
        ({"sealed": None}, "sealed"),
    ],
)
def test_rejects_bad_heads(change: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequestHead) as info:
        RequestHead.parse(head(**change))
    assert field in str(info.value)


def test_missing_field_named() -> None:
    doc = head()
    del doc["base_url"]
    with pytest.raises(BadRequestHead, match="base_url: missing field"):
        RequestHead.parse(doc)


def test_not_json_or_not_object() -> None:
    with pytest.raises(BadRequestHead, match="not valid JSON"):
        RequestHead.parse(b"\xff{")
    with pytest.raises(BadRequestHead, match="JSON object"):
        RequestHead.parse(b"[1]")


def test_error_never_echoes_values() -> None:
    with pytest.raises(BadRequestHead) as info:
        RequestHead.parse(head(headers=[["authorization", "Basic c2VjcmV0\r\n"]]))
    assert "c2VjcmV0" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": 1}, "method: Input should be a valid string"),
        ({"headers": [["x-a"]]}, "headers.0.1: missing field"),
        ({"headers": {"x-a": "1"}}, "headers: Input should be a valid tuple"),
        (
            {"headers": [["a", "b", "c"]]},
            "headers.0: Tuple should have at most 2 items after validation, not 3",
        ),
        (
            {"headers": [["bad name", "x"]]},
            "headers: header 0: name is not a token (RFC 9110 §5.1)",
        ),
        (
            {"auth": {"type": "ntlm"}},
            "auth.type: Input should be 'none', 'basic', 'api_key' or 'windows'",
        ),
        ({"auth": "x"}, "auth: Input should be a valid dictionary or instance of AuthSpec"),
        ({"auth": {"type": "api_key"}}, "auth: api_key auth needs api_key_name and api_key_in"),
        ({"timeout_ms": 0}, "timeout_ms: Input should be greater than 0"),
        ({"timeout_ms": 3_600_001}, "timeout_ms: Input should be less than or equal to 3600000"),
        ({"timeout_ms": True}, "timeout_ms: Input should be a valid integer"),
        ({"key_version": 0}, "key_version: Input should be greater than or equal to 1"),
        ({"connection_id": ""}, "connection_id: String should have at least 1 character"),
        ({"method": "X" * 33}, "method: String should have at most 32 characters"),
        ({"extra": 1, "method": 1}, "method: Input should be a valid string; extra: unknown field"),
    ],
)
def test_messages_name_the_field_and_the_rule(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequestHead) as info:
        RequestHead.parse(head(**change))
    assert str(info.value) == f"bad request head: {message}"


def test_problems_are_reported_in_field_order_five_at_most() -> None:
    doc = head(method=1, url=2, connection_id=3, suite=4, timeout_ms="5", extra=6)
    del doc["base_url"]
    with pytest.raises(BadRequestHead) as info:
        RequestHead.parse(doc)
    assert str(info.value) == (
        "bad request head: method: Input should be a valid string; "
        "url: Input should be a valid string; connection_id: Input should be a valid string; "
        "base_url: missing field; suite: Input should be a valid string"
    )


def test_key_version_defaults_to_one_and_heads_compare_by_value() -> None:
    parsed = RequestHead.parse(head())
    assert parsed.key_version == 1
    assert parsed == RequestHead.parse(head(key_version=1))
    assert parsed != RequestHead.parse(head(key_version=2))
    assert hash(parsed) == hash(RequestHead.parse(head()))
    assert "AAAA" not in repr(parsed)  # the sealed credentials stay out of logs


def test_auth_spec_made_directly_checks_the_same_rules() -> None:
    assert AuthSpec(type="windows").windows_scheme == "negotiate"
    assert AuthSpec(type="windows") == AuthSpec(type="windows", windows_scheme="negotiate")
    assert len({AuthSpec(type="basic"), AuthSpec(type="basic")}) == 1
    with pytest.raises(ValueError, match="apply only to windows auth"):
        AuthSpec(type="basic", spn="HTTP/x")
    with pytest.raises(ValueError, match="api_key auth needs"):
        AuthSpec(type="api_key")
    with pytest.raises(ValueError, match="Input should be 'none'"):
        AuthSpec(type="ntlm")  # type: ignore[arg-type]


#: Token and field-value characters, and ones that are neither (LF, CR, NUL, DEL, U+0100).
_HEADER_CHARS = "aZ9-_!~ :\t\n\r\x00\x7f\x80\xff\u0100,"
_HEADER_TEXT = st.text(alphabet=st.sampled_from(_HEADER_CHARS), max_size=6)


@given(st.lists(st.lists(_HEADER_TEXT, min_size=0, max_size=3), max_size=5))
@settings(max_examples=400, deadline=None)
def test_the_joined_header_check_decides_as_the_pair_by_pair_one(
    pairs: list[list[str]],
) -> None:
    """_headers checks well-formed pairs with one expression for all names and one for all
    values; it must accept and refuse exactly what _check_headers, pair by pair, does."""
    fast, slow = head_module._Problems(), head_module._Problems()
    assert head_module._headers(pairs, fast) == head_module._check_headers(pairs, slow)
    assert fast.found == slow.found
