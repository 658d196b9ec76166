"""The request head the relay sends in an OPEN frame, validated before anything is done with it.

The relay is not trusted (it may be compromised), so the head is parsed strictly: unknown or
missing fields, wrong types, a method that is not an RFC 9110 §9.1 token, header names that are
not tokens (§5.1) or values with CR, LF, NUL or other controls (§5.5) are all refused with
:class:`~agent.errors.BadRequestHead` before any socket is opened. Error messages name the
field, never echo its value.

Schema (JSON)::

    {"method": "GET", "url": "http://127.0.0.1:8080/api/x?q=1",
     "headers": [["accept", "*/*"]], "connection_id": "cxn_...",
     "base_url": "http://127.0.0.1:8080/api/",
     "auth": {"type": "none" | "basic" | "api_key" | "windows",
              "api_key_name": str | null, "api_key_in": "header" | "query" | null,
              "windows_scheme": "negotiate" | "ntlm" | "kerberos",   (windows only)
              "spn": "HTTP/host" | null},                             (windows only)
     "suite": "MLKEM768_X25519/...", "sealed": "<base64url>", "timeout_ms": 30000,
     "key_version": 1}

``key_version`` names the gateway key generation the credentials are sealed to (a rotation
re-seals them to the next one); a relay that predates rotation leaves it out, meaning 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import BadRequestHead

__all__ = ["MAX_HEADER_BYTES", "SPN_RE", "AuthSpec", "RequestHead", "is_token", "valid_field_value"]

#: RFC 9110 §5.6.2 ``token``.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: RFC 9110 §5.5 field-value: VCHAR, obs-text, SP and HTAB; no CR, LF, NUL or other controls.
_FIELD_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")
MAX_HEADERS = 256
MAX_HEADER_BYTES = 64 * 1024
MAX_URL = 16 * 1024
MAX_TIMEOUT_MS = 3_600_000
#: A Kerberos service principal for HTTP: ``SERVICE/host`` (the realm comes from krb5.conf).
SPN_RE = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}/[A-Za-z0-9][A-Za-z0-9.\-]{0,252}\Z")

Id = Annotated[StrictStr, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$")]


def is_token(text: str) -> bool:
    return bool(_TOKEN_RE.match(text))


def valid_field_value(text: str) -> bool:
    return bool(_FIELD_VALUE_RE.match(text))


class AuthSpec(BaseModel):
    """How the connection authenticates to the internal API (the credentials travel sealed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["none", "basic", "api_key", "windows"]
    api_key_name: StrictStr | None = None
    api_key_in: Literal["header", "query"] | None = None
    #: Windows auth only (sent only for it, so older agents never see the keys).
    windows_scheme: Literal["negotiate", "ntlm", "kerberos"] | None = None
    spn: StrictStr | None = None

    @model_validator(mode="after")
    def _windows_fields(self) -> Self:
        if self.type != "windows":
            if self.windows_scheme is not None or self.spn is not None:
                raise ValueError("windows_scheme and spn apply only to windows auth")
            return self
        if self.windows_scheme is None:
            object.__setattr__(self, "windows_scheme", "negotiate")
        if self.spn is not None and not SPN_RE.match(self.spn):
            raise ValueError("spn must look like SERVICE/host (e.g. HTTP/api.corp.example)")
        return self

    @model_validator(mode="after")
    def _api_key_fields(self) -> Self:
        if self.type == "api_key":
            if not self.api_key_name or self.api_key_in is None:
                raise ValueError("api_key auth needs api_key_name and api_key_in")
            if self.api_key_in == "header" and not is_token(self.api_key_name):
                raise ValueError("api_key_name is not a valid header name")
            if not valid_field_value(self.api_key_name) or len(self.api_key_name) > 256:
                raise ValueError("api_key_name contains invalid characters")
        return self


class RequestHead(BaseModel):
    """One OPEN payload. Build it with :meth:`parse`, which maps errors to BadRequestHead."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: StrictStr = Field(max_length=32)
    url: StrictStr = Field(min_length=1, max_length=MAX_URL)
    headers: tuple[tuple[StrictStr, StrictStr], ...] = Field(max_length=MAX_HEADERS)
    connection_id: Id
    base_url: StrictStr = Field(min_length=1, max_length=MAX_URL)
    auth: AuthSpec
    suite: StrictStr = Field(min_length=1, max_length=200)
    sealed: StrictStr = Field(max_length=1024 * 1024)
    timeout_ms: StrictInt = Field(gt=0, le=MAX_TIMEOUT_MS)
    key_version: StrictInt = Field(default=1, ge=1, le=10**9)

    @field_validator("method")
    @classmethod
    def _method_token(cls, value: str) -> str:
        if not is_token(value):
            raise ValueError("method must be an HTTP token (RFC 9110 §9.1)")
        return value

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        total = 0
        for index, (name, field_value) in enumerate(value):
            if not is_token(name):
                raise ValueError(f"header {index}: name is not a token (RFC 9110 §5.1)")
            if not valid_field_value(field_value):
                raise ValueError(
                    f"header {index} ({name}): value contains CR, LF, NUL or another control "
                    "character (RFC 9110 §5.5)"
                )
            total += len(name) + len(field_value) + 4
        if total > MAX_HEADER_BYTES:
            raise ValueError(f"headers exceed {MAX_HEADER_BYTES} bytes")
        return value

    @property
    def timeout_seconds(self) -> float:
        return self.timeout_ms / 1000

    @classmethod
    def parse(cls, payload: bytes | str | Mapping[str, Any]) -> RequestHead:
        """Validate an OPEN payload (JSON bytes/text or an already decoded mapping)."""
        if isinstance(payload, bytes | str):
            try:
                payload = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                raise BadRequestHead("request head is not valid JSON") from None
        if not isinstance(payload, Mapping):
            raise BadRequestHead("request head must be a JSON object")
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise BadRequestHead(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_input=False, include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(head)"
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "missing field"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}")
    return "bad request head: " + "; ".join(problems)
