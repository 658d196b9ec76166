"""Reading the JSON of real-world definition files, which are often less tidy than the spec.

Files saved by Windows tools start with a UTF-8 byte-order mark; keys written by hand come
in any casing (``templateId``, ``TemplateId``). These helpers absorb both so the rest of the
importer reads plain dictionaries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from relay.importer.errors import DefinitionError


def parse(value: Any, what: str) -> dict[str, Any]:
    """A JSON object from a dict, or from JSON text/bytes (with or without a BOM)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                value = value.decode("utf-16")
            except UnicodeDecodeError:
                raise DefinitionError(f"{what}: not UTF-8 or UTF-16 text") from None
    if isinstance(value, str):
        try:
            value = json.loads(value.lstrip("\ufeff"))
        except ValueError as exc:
            raise DefinitionError(f"{what}: not valid JSON ({exc.args[0]})") from None
    if not isinstance(value, dict):
        raise DefinitionError(f"{what}: must be a JSON object")
    return value


def get(doc: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    """``doc[key]``, matching the key case-insensitively when the exact one is absent."""
    if not isinstance(doc, Mapping):
        return default
    if key in doc:
        return doc[key]
    lower = key.lower()
    for name, value in doc.items():
        if isinstance(name, str) and name.lower() == lower:
            return value
    return default


def obj(doc: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    """A nested object, or {} when absent or not an object."""
    value = get(doc, key)
    return value if isinstance(value, dict) else {}


def items(doc: Mapping[str, Any] | None, key: str) -> list[Any]:
    """A nested array, or [] when absent or not an array (``true`` or a number included)."""
    value = get(doc, key)
    return value if isinstance(value, list) else []


def text(value: Any) -> str | None:
    """A stripped non-empty string, or None."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def truthy(value: Any, default: bool) -> bool:
    """Booleans as files write them: true, "true", "True", 1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in {"true", "yes", "1"}:
            return True
        if low in {"false", "no", "0"}:
            return False
    if isinstance(value, int):
        return value != 0
    return default
