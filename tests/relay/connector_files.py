"""The hand-written connector definitions under fixtures/connectors, as import bodies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "connectors"


def text(name: str, file: str) -> str:
    """A fixture file's text as stored (a BOM, if the file has one, is kept)."""
    return (FIXTURES / name / file).read_bytes().decode("utf-8")


def import_body(name: str, **extra: Any) -> dict[str, Any]:
    """The POST /v1/connectors/import body for one fixture folder, files sent as text."""
    folder = FIXTURES / name
    body: dict[str, Any] = {}
    if (folder / "openapi.json").exists():
        body["openapi"] = text(name, "openapi.json")
    else:
        body["swagger"] = text(name, "apiDefinition.swagger.json")
        if (folder / "apiProperties.json").exists():
            body["api_properties"] = text(name, "apiProperties.json")
        if (folder / "script.csx").exists():
            body["script"] = text(name, "script.csx")
    return body | extra
