"""Compact JSON for the data path: the standard library's C encoder and scanner, called once
per document instead of through ``json.dumps``/``json.loads``.

``json.JSONEncoder.encode`` builds a new C encoder for every document, and ``json.loads``
goes through ``detect_encoding``, ``JSONDecoder.decode`` and ``raw_decode`` in Python before
the C scanner runs: about a microsecond each way for a small head, on every request at both
ends of the tunnel. The output and the accepted input are the standard library's, with two
differences that only refuse more: bytes must be UTF-8 (RFC 8259 §8.1; ``json.loads`` also
guesses UTF-16 and UTF-32), and a reference cycle in what is encoded is a RecursionError
rather than a ValueError (nothing encoded here is built by a peer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from json import encoder, scanner
from typing import Any

__all__ = ["dumps", "loads"]

#: What ``json.decoder`` skips around a document.
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_scan: Callable[[str, int], tuple[Any, int]] = scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]
)
_c_make_encoder: Callable[..., Callable[[Any, int], list[str]]] | None = getattr(
    encoder, "c_make_encoder", None
)
_COMPACT = json.JSONEncoder(separators=(",", ":"))
_c_encode = (
    _c_make_encoder(
        None,  # no cycle markers
        _COMPACT.default,
        encoder.encode_basestring_ascii,
        None,  # no indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
    if _c_make_encoder is not None
    else None  # an interpreter without the _json accelerator
)


def dumps(obj: Any) -> str:
    """``json.dumps(obj, separators=(",", ":"))``."""
    if _c_encode is None:
        return _COMPACT.encode(obj)
    return "".join(_c_encode(obj, 0))


def loads(data: str | bytes | bytearray | memoryview) -> Any:
    """``json.loads(data)`` for one UTF-8 document; ValueError (JSONDecodeError or
    UnicodeDecodeError) when it is not one."""
    text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    start = 0
    if text[:1] in (" ", "\t", "\n", "\r"):
        start = _skip(text, 0)
    try:
        obj, end = _scan(text, start)
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    if end != len(text):
        end = _skip(text, end)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    return obj


def _skip(text: str, at: int) -> int:
    found = _WHITESPACE.match(text, at)
    return found.end() if found is not None else at
