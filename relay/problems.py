"""RFC 9457 problem details: the only error body the relay ever sends.

A caller (or a flow engine) can branch on ``status`` and ``type`` without parsing free text,
and no handler ever leaks a traceback or echoes request input back: validation errors name
the field and the rule, never the value, because the value may be a password.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from relay import RelayError
from relay.store import Conflict, Forbidden, NotFound, StoreError

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:backhaul:problem:"

log = structlog.get_logger()


def _type_for(title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return TYPE_PREFIX + (slug or "error")


def problem(
    status: int,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    *,
    type_: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """Build a problem+json response; ``type`` is derived from the title so it stays stable."""
    body: dict[str, Any] = {
        "type": type_ or _type_for(title),
        "title": title,
        "status": status,
        "detail": detail,
    }
    if extra:
        body.update(extra)
    return JSONResponse(
        body, status_code=status, headers=dict(headers or {}), media_type=MEDIA_TYPE
    )


class ProblemError(RelayError):
    """Raised anywhere under a route to answer with a problem; the handler renders it."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = dict(headers or {})
        #: Extension members of the problem document (RFC 9457 §3.2), e.g. ``reason``.
        self.extra = dict(extra or {})

    def response(self) -> JSONResponse:
        return problem(self.status, self.title, self.detail, self.headers, extra=self.extra)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _field(loc: tuple[int | str, ...] | list[int | str]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header", "cookie"}:
        parts = parts[1:] if len(parts) > 1 else parts
    return ".".join(parts) or "body"


def _validation_detail(errors: Any) -> tuple[str, list[dict[str, str]]]:
    """Field names and rules only: pydantic's ``input`` would echo secrets back."""
    items = [{"field": _field(e.get("loc", ())), "message": str(e.get("msg", ""))} for e in errors]
    detail = "; ".join(f"{i['field']}: {i['message']}" for i in items) or "invalid request"
    return detail, items


async def _on_problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return exc.response()


async def _on_http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such resource"
    return problem(exc.status_code, _phrase(exc.status_code), detail, exc.headers)


async def _on_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail, items = _validation_detail(exc.errors())
    return problem(422, "Invalid request", detail, extra={"errors": items})


_STORE_STATUS = {
    NotFound: (404, "Not Found"),
    Forbidden: (403, "Forbidden"),
    Conflict: (409, "Conflict"),
}


async def _on_store(_: Request, exc: Exception) -> JSONResponse:
    """Store lookups raise plain errors; this is where they become HTTP outcomes."""
    status, title = next(
        (v for k, v in _STORE_STATUS.items() if isinstance(exc, k)), (409, "Conflict")
    )
    return problem(status, title, str(exc))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", path=request.url.path, error=type(exc).__name__)
    return problem(500, "Internal Server Error", "the relay failed to handle this request")


def install(app: FastAPI) -> None:
    """Route every error the app can produce to a problem+json body."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StoreError, _on_store)
    app.add_exception_handler(Exception, _on_unexpected)
