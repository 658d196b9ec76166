from __future__ import annotations

import json
from typing import Any

import pytest

from agent.errors import BadRequestHead
from agent.head import RequestHead


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
