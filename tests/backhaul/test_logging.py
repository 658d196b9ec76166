from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from backhaul.errors import ConfigError
from backhaul.logging import REDACTED, configure, redact, redact_text

SECRETS = [
    "hunter2",
    "bh_live_0123456789abcdef",
    "bhe_enroll0123456789",
    "dXNlcjpodW50ZXIy",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
    "TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw",
    "s3cr3t-key",
    "sealedblob",
    "cookieval",
]


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_backhaul_handler", False):
            root.removeHandler(handler)
    structlog.reset_defaults()


def emit_everything() -> None:
    log = structlog.get_logger("backhaul.test")
    log.debug(
        "request",
        password="hunter2",
        Authorization="Basic dXNlcjpodW50ZXIy",
        headers=[["authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig"]],
        nested={"inner": {"client_secret": "s3cr3t-key", "ok": "visible-value"}},
        url="https://api.internal/x?user=bob&password=hunter2&page=2",
        note="token bh_live_0123456789abcdef was used",
        enroll="bhe_enroll0123456789",
        sealed="sealedblob",
        cookie="cookieval",
    )
    log.info(
        "header line Authorization: Negotiate "
        "TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw"
    )
    logging.getLogger("websockets.client").debug(
        "connecting to %s", "wss://relay/v1/tunnel?api_key=s3cr3t-key"
    )
    logging.getLogger("httpx").info("HTTP Request: GET https://api.internal/x?apikey=s3cr3t-key")
    logging.getLogger("uvicorn.error").info("token=%s", "bh_live_0123456789abcdef")
    try:
        raise ValueError("login failed for password=hunter2")
    except ValueError:
        log.exception("boom")


def test_json_output_has_no_secrets_at_debug() -> None:
    stream = io.StringIO()
    configure("json", "debug", stream)
    emit_everything()
    out = stream.getvalue()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 5
    for secret in SECRETS:
        assert secret not in out, secret
    assert "visible-value" in out
    assert "page=2" in out and "user=bob" in out
    first = lines[0]
    assert first["password"] == REDACTED
    assert first["level"] == "debug"
    assert first["logger"] == "backhaul.test"
    assert "timestamp" in first
    assert lines[2]["logger"] == "websockets.client"
    assert "HTTP Request" not in out  # httpx request lines are kept below warning
    assert "exception" in lines[4]


def test_console_output_has_no_secrets() -> None:
    stream = io.StringIO()
    configure("console", "debug", stream)
    emit_everything()
    out = stream.getvalue()
    assert "request" in out
    for secret in SECRETS:
        assert secret not in out, secret
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_auto_is_json_when_not_a_tty() -> None:
    stream = io.StringIO()
    configure("auto", "info", stream)
    structlog.get_logger().info("hello", n=1)
    assert json.loads(stream.getvalue())["n"] == 1


def test_level_filters() -> None:
    stream = io.StringIO()
    configure("json", "warning", stream)
    structlog.get_logger().info("hidden")
    logging.getLogger("httpx").info("hidden too")
    structlog.get_logger().warning("shown")
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["shown"]


def test_reconfigure_does_not_duplicate() -> None:
    stream = io.StringIO()
    configure("json", "info", io.StringIO())
    configure("json", "info", stream)
    structlog.get_logger().info("once")
    assert len(stream.getvalue().splitlines()) == 1


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match=r"log\.level"):
        configure("json", "loud")
    with pytest.raises(ConfigError, match=r"log\.format"):
        configure("xml", "info")


def test_redact_function() -> None:
    event = {
        "event": "x",
        "API_KEY": "k",
        "x-apikey": "k",
        "private_key": "k",
        "credentials": {"username": "u", "password": "p"},
        "items": [{"token": "t"}, "plain", ("cookie", "c")],
        "count": 3,
        "flag": True,
        "nothing": None,
        "raw": b"Authorization: Bearer abcdefabcdefabcdef",
    }
    out = redact(event)
    assert out["API_KEY"] == REDACTED
    assert out["x-apikey"] == REDACTED
    assert out["private_key"] == REDACTED
    assert out["credentials"] == REDACTED
    assert out["items"] == [{"token": REDACTED}, "plain", ["cookie", REDACTED]]
    assert out["count"] == 3 and out["flag"] is True and out["nothing"] is None
    assert "abcdef" not in out["raw"]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("authorization=Bearer abc.def.ghi", "abc.def.ghi"),
        ("Proxy-Authorization: NTLM TlRMTVNTUAAB", "TlRMTVNTUAAB"),
        ("'authorization': 'Negotiate YIIGhgYJKoZIhvcSAQICAQBu'", "YIIGhgYJKoZIhvcSAQICAQBu"),
        ("sent Bearer 0123456789abcdef0123 upstream", "0123456789abcdef0123"),
        ("GET /x?password=p%40ss&y=1", "p%40ss"),
        ("GET /x?y=1&client_secret=abc", "abc"),
        ("use bh_abcDEF_123-xyz now", "abcDEF_123-xyz"),
        ("bhe_xyz", "xyz"),
    ],
)
def test_redact_text_patterns(text: str, secret: str) -> None:
    masked = redact_text(text)
    assert secret not in masked
    assert REDACTED in masked


def test_redact_text_leaves_ordinary_text() -> None:
    text = "GET https://api.internal/v1/users?page=2 -> 200 in 12 ms (Basic auth)"
    assert redact_text(text) == text
