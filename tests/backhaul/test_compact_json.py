"""backhaul.compact_json: the standard library's JSON, without its per-call layers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backhaul.compact_json import dumps, loads
from tests.fuzzing import budget

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_documents = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=budget(300))
@given(_documents)
def test_dumps_is_compact_json_dumps_and_loads_reads_it_back(doc: Any) -> None:
    text = dumps(doc)
    assert text == json.dumps(doc, separators=(",", ":"))
    assert loads(text) == doc
    assert loads(text.encode()) == doc
    assert loads(memoryview(text.encode())) == doc


@settings(max_examples=budget(500))
@given(st.text(alphabet=' \t\n\r{}[]",:0123456789.eE+-truefalsn\\u'))
def test_loads_accepts_and_refuses_what_json_loads_does(text: str) -> None:
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            loads(text)
    except RecursionError:
        with pytest.raises(RecursionError):
            loads(text)
    else:
        assert loads(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "{", '{"a":1} x', "[1,]", "nul", '"\\ud800', "{} {}", "\ufeff{}"]
)
def test_malformed_documents_are_value_errors(text: str) -> None:
    with pytest.raises(ValueError):
        loads(text)


def test_whitespace_around_a_document_is_skipped_as_by_json() -> None:
    assert loads(' \n{"a": [1, 2]}\t\r\n') == {"a": [1, 2]}


def test_bytes_must_be_utf8() -> None:
    assert loads('{"k":"caf\u00e9"}'.encode()) == {"k": "caf\u00e9"}
    with pytest.raises(ValueError):
        loads('{"k":"caf\u00e9"}'.encode("utf-16"))
    with pytest.raises(ValueError):
        loads(b'{"k":"\xff"}')


def test_non_ascii_is_escaped_as_json_dumps_does() -> None:
    assert dumps({"k": "caf\u00e9 \U0001f600"}) == '{"k":"caf\\u00e9 \\ud83d\\ude00"}'
