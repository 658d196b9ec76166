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

The checks are written out here rather than declared to pydantic: a head is parsed for every
request, and the module compiles with mypyc (setup.py), which pydantic models do not. They
are pydantic's checks with its messages (strict types: no numbers as strings, no booleans as
integers), every problem found, the first five reported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final, Literal, cast

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
MAX_SEALED = 1024 * 1024
#: A Kerberos service principal for HTTP: ``SERVICE/host`` (the realm comes from krb5.conf).
SPN_RE = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}/[A-Za-z0-9][A-Za-z0-9.\-]{0,252}\Z")
#: Several of each, one per line (see _headers).
_TOKENS_RE = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+\n)*[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FIELD_VALUES_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*(?:\n[\t\x20-\x7e\x80-\xff]*)*\Z")
#: Connection ids: 1 to 200 of these characters.
_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]+\Z")
_ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"

AuthType = Literal["none", "basic", "api_key", "windows"]
ApiKeyIn = Literal["header", "query"]
WindowsScheme = Literal["negotiate", "ntlm", "kerberos"]
_AUTH_TYPES = ("none", "basic", "api_key", "windows")
_API_KEY_IN = ("header", "query")
_WINDOWS_SCHEMES = ("negotiate", "ntlm", "kerberos")
_AUTH_FIELDS = frozenset({"type", "api_key_name", "api_key_in", "windows_scheme", "spn"})
_HEAD_FIELDS = (
    "method",
    "url",
    "headers",
    "connection_id",
    "base_url",
    "auth",
    "suite",
    "sealed",
    "timeout_ms",
    "key_version",
)
_KNOWN = frozenset(_HEAD_FIELDS)
#: Problems named in a refusal; the rest are left out.
_REPORTED = 5


def is_token(text: str) -> bool:
    return bool(_TOKEN_RE.match(text))


def valid_field_value(text: str) -> bool:
    return bool(_FIELD_VALUE_RE.match(text))


class _Problems:
    """The problems found in one head, each ``location: message``."""

    __slots__ = ("found",)

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.found.append(f"{where}: {message}")


#: A required field that is not there (already reported as missing).
_MISSING = object()


def _field(doc: Mapping[str, Any], name: str, problems: _Problems) -> object:
    """``doc[name]``, or :data:`_MISSING` with the problem noted."""
    if name in doc:
        return doc[name]
    problems.add(name, "missing field")
    return _MISSING


def _one_of(options: tuple[str, ...]) -> str:
    quoted = [f"'{option}'" for option in options]
    return "Input should be " + ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _string(
    value: object, where: str, problems: _Problems, min_length: int = 0, max_length: int = 0
) -> str | None:
    """``value`` if it is a string within the bounds (``max_length`` 0: none), else None."""
    if value is _MISSING:
        return None
    if type(value) is not str:
        problems.add(where, "Input should be a valid string")
        return None
    if len(value) < min_length:
        s = "" if min_length == 1 else "s"
        problems.add(where, f"String should have at least {min_length} character{s}")
        return None
    if max_length and len(value) > max_length:
        problems.add(where, f"String should have at most {max_length} characters")
        return None
    return value


def _optional_string(value: object, where: str, problems: _Problems) -> str | None:
    return None if value is None else _string(value, where, problems)


def _choice(value: object, options: tuple[str, ...], where: str, problems: _Problems) -> str | None:
    if type(value) is str and value in options:
        return value
    problems.add(where, _one_of(options))
    return None


def _integer(value: object, where: str, problems: _Problems, low: int, high: int) -> int | None:
    """``value`` if it is an integer (not a boolean) with ``low`` <= value <= ``high``."""
    if type(value) is not int:
        problems.add(where, "Input should be a valid integer")
        return None
    if value < low:
        problems.add(where, f"Input should be greater than or equal to {low}")
        return None
    if value > high:
        problems.add(where, f"Input should be less than or equal to {high}")
        return None
    return value


def _auth_rules(
    type_: str,
    api_key_name: str | None,
    api_key_in: str | None,
    windows_scheme: str | None,
    spn: str | None,
) -> str | None:
    """What is wrong with an auth object whose fields each have the right type, if anything."""
    if type_ != "windows":
        if windows_scheme is not None or spn is not None:
            return "windows_scheme and spn apply only to windows auth"
    elif spn is not None and not SPN_RE.match(spn):
        return "spn must look like SERVICE/host (e.g. HTTP/api.corp.example)"
    if type_ == "api_key":
        if not api_key_name or api_key_in is None:
            return "api_key auth needs api_key_name and api_key_in"
        if api_key_in == "header" and not is_token(api_key_name):
            return "api_key_name is not a valid header name"
        if not valid_field_value(api_key_name) or len(api_key_name) > 256:
            return "api_key_name contains invalid characters"
    return None


class AuthSpec:
    """How the connection authenticates to the internal API (the credentials travel sealed).

    Windows auth without a scheme means ``negotiate``. Made with wrong fields, it raises
    ValueError; :meth:`RequestHead.parse` reports the same problems as a BadRequestHead."""

    __slots__ = ("api_key_in", "api_key_name", "spn", "type", "windows_scheme")

    def __init__(
        self,
        type: AuthType,  # the field's name on the wire
        api_key_name: str | None = None,
        api_key_in: ApiKeyIn | None = None,
        windows_scheme: WindowsScheme | None = None,
        spn: str | None = None,
    ) -> None:
        problem = _auth_rules(type, api_key_name, api_key_in, windows_scheme, spn)
        if type not in _AUTH_TYPES:
            problem = _one_of(_AUTH_TYPES)
        if problem is not None:
            raise ValueError(problem)
        self.type: Final = type
        self.api_key_name: Final = api_key_name
        self.api_key_in: Final = api_key_in
        scheme: WindowsScheme | None = windows_scheme
        if type == "windows" and scheme is None:
            scheme = "negotiate"
        self.windows_scheme: Final = scheme
        self.spn: Final = spn

    def _fields(self) -> tuple[str, str | None, str | None, str | None, str | None]:
        return (self.type, self.api_key_name, self.api_key_in, self.windows_scheme, self.spn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AuthSpec) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"AuthSpec(type={self.type!r}, api_key_name={self.api_key_name!r}, "
            f"api_key_in={self.api_key_in!r}, windows_scheme={self.windows_scheme!r}, "
            f"spn={self.spn!r})"
        )

    @staticmethod
    def _parse(value: object, problems: _Problems) -> AuthSpec | None:
        if value is _MISSING:
            return None
        if type(value) is not dict and not isinstance(value, Mapping):  # dict: no ABC check
            problems.add("auth", "Input should be a valid dictionary or instance of AuthSpec")
            return None
        before = len(problems.found)
        type_: str | None = None
        if "type" not in value:
            problems.add("auth.type", "missing field")
        else:
            type_ = _choice(value["type"], _AUTH_TYPES, "auth.type", problems)
        name = _optional_string(value.get("api_key_name"), "auth.api_key_name", problems)
        where = value.get("api_key_in")
        key_in = None if where is None else _choice(where, _API_KEY_IN, "auth.api_key_in", problems)
        scheme = value.get("windows_scheme")
        if scheme is not None:
            scheme = _choice(scheme, _WINDOWS_SCHEMES, "auth.windows_scheme", problems)
        spn = _optional_string(value.get("spn"), "auth.spn", problems)
        for key in value:
            if key not in _AUTH_FIELDS:
                problems.add(f"auth.{key}", "unknown field")
        if len(problems.found) > before or type_ is None:
            return None
        problem = _auth_rules(type_, name, key_in, scheme, spn)
        if problem is not None:
            problems.add("auth", problem)
            return None
        return AuthSpec(
            cast(AuthType, type_),
            name,
            cast(ApiKeyIn | None, key_in),
            cast(WindowsScheme | None, scheme),
            spn,
        )


class RequestHead:
    """One OPEN payload. Build it with :meth:`parse`, which refuses a bad one with a
    BadRequestHead naming the fields, never their values."""

    __slots__ = (
        "auth",
        "base_url",
        "connection_id",
        "headers",
        "key_version",
        "method",
        "sealed",
        "suite",
        "timeout_ms",
        "url",
    )

    def __init__(
        self,
        method: str,
        url: str,
        headers: tuple[tuple[str, str], ...],
        connection_id: str,
        base_url: str,
        auth: AuthSpec,
        suite: str,
        sealed: str,
        timeout_ms: int,
        key_version: int = 1,
    ) -> None:
        self.method: Final = method
        self.url: Final = url
        self.headers: Final = headers
        self.connection_id: Final = connection_id
        self.base_url: Final = base_url
        self.auth: Final = auth
        self.suite: Final = suite
        self.sealed: Final = sealed
        self.timeout_ms: Final = timeout_ms
        self.key_version: Final = key_version

    @property
    def timeout_seconds(self) -> float:
        return self.timeout_ms / 1000

    def _fields(self) -> tuple[object, ...]:
        return (
            self.method,
            self.url,
            self.headers,
            self.connection_id,
            self.base_url,
            self.auth,
            self.suite,
            self.sealed,
            self.timeout_ms,
            self.key_version,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequestHead) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:  # the sealed credentials and the headers stay out of logs
        return f"RequestHead(method={self.method!r}, connection_id={self.connection_id!r})"

    @classmethod
    def parse(cls, payload: bytes | str | Mapping[str, Any]) -> RequestHead:
        """Validate an OPEN payload (JSON bytes/text or an already decoded mapping)."""
        if isinstance(payload, bytes | str):
            try:
                payload = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                raise BadRequestHead("request head is not valid JSON") from None
        if type(payload) is not dict and not isinstance(payload, Mapping):
            raise BadRequestHead("request head must be a JSON object")
        head = _parse_head(payload, problems := _Problems())
        if head is None:
            raise BadRequestHead("bad request head: " + "; ".join(problems.found[:_REPORTED]))
        return head


def _parse_head(doc: Mapping[str, Any], problems: _Problems) -> RequestHead | None:
    method = _string(_field(doc, "method", problems), "method", problems, max_length=32)
    if method is not None and not is_token(method):
        problems.add("method", "method must be an HTTP token (RFC 9110 §9.1)")
        method = None
    url = _string(_field(doc, "url", problems), "url", problems, 1, MAX_URL)
    headers = _headers(_field(doc, "headers", problems), problems)
    connection_id = _string(
        _field(doc, "connection_id", problems), "connection_id", problems, 1, 200
    )
    if connection_id is not None and not _ID_RE.match(connection_id):
        problems.add("connection_id", f"String should match pattern '{_ID_PATTERN}'")
        connection_id = None
    base_url = _string(_field(doc, "base_url", problems), "base_url", problems, 1, MAX_URL)
    auth = AuthSpec._parse(_field(doc, "auth", problems), problems)
    suite = _string(_field(doc, "suite", problems), "suite", problems, 1, 200)
    sealed = _string(_field(doc, "sealed", problems), "sealed", problems, 0, MAX_SEALED)
    timeout_ms = _positive(_field(doc, "timeout_ms", problems), problems)
    key_version: int | None = 1
    if "key_version" in doc:
        key_version = _integer(doc["key_version"], "key_version", problems, 1, 10**9)
    for key in doc:
        if key not in _KNOWN:
            problems.add(str(key), "unknown field")
    if (
        problems.found
        or method is None
        or url is None
        or headers is None
        or connection_id is None
        or base_url is None
        or auth is None
        or suite is None
        or sealed is None
        or timeout_ms is None
        or key_version is None
    ):
        return None
    return RequestHead(
        method, url, headers, connection_id, base_url, auth, suite, sealed, timeout_ms, key_version
    )


def _positive(value: object, problems: _Problems) -> int | None:
    if value is _MISSING:
        return None
    if type(value) is int and value <= 0:
        problems.add("timeout_ms", "Input should be greater than 0")
        return None
    return _integer(value, "timeout_ms", problems, 1, MAX_TIMEOUT_MS)


def _headers(value: object, problems: _Problems) -> tuple[tuple[str, str], ...] | None:
    """A list of [name, value] pairs: tokens, field values, MAX_HEADERS and
    MAX_HEADER_BYTES at most.

    A list of well-formed pairs is checked with one expression over all the names and one
    over all the values, joined by LFs (which neither may hold: a LF more than the joins
    fails them); anything else takes :func:`_check_headers`, which names the problem's
    place."""
    if value is _MISSING:
        return None
    if not isinstance(value, list | tuple):
        problems.add("headers", "Input should be a valid tuple")
        return None
    if len(value) > MAX_HEADERS:
        problems.add(
            "headers",
            f"Tuple should have at most {MAX_HEADERS} items after validation, not {len(value)}",
        )
        return None
    pairs: list[tuple[str, str]] = []
    total = 0
    for pair in value:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            name, field_value = pair[0], pair[1]
            if type(name) is str and type(field_value) is str:
                pairs.append((name, field_value))
                total += len(name) + len(field_value) + 4
                continue
        return _check_headers(value, problems)
    if pairs:
        names = "\n".join([name for name, _ in pairs])
        fields = "\n".join([field for _, field in pairs])
        lines = len(pairs) - 1  # a LF more than the joins is one inside a name or a value
        if not (
            names.count("\n") == lines
            and fields.count("\n") == lines
            and _TOKENS_RE.match(names)
            and _FIELD_VALUES_RE.match(fields)
        ):
            return _check_headers(value, problems)
    if total > MAX_HEADER_BYTES:
        problems.add("headers", f"headers exceed {MAX_HEADER_BYTES} bytes")
        return None
    return tuple(pairs)


def _check_headers(
    value: list[object] | tuple[object, ...], problems: _Problems
) -> tuple[tuple[str, str], ...] | None:
    """:func:`_headers` pair by pair, naming where each problem is."""
    pairs: list[tuple[str, str]] = []
    before = len(problems.found)
    for index, pair in enumerate(value):
        where = f"headers.{index}"
        if not isinstance(pair, list | tuple):
            problems.add(where, "Input should be a valid tuple")
            continue
        if len(pair) > 2:
            problems.add(
                where, f"Tuple should have at most 2 items after validation, not {len(pair)}"
            )
            continue
        if len(pair) < 2:
            for missing in range(len(pair), 2):
                problems.add(f"{where}.{missing}", "missing field")
            if pair:
                _string(pair[0], f"{where}.0", problems)
            continue
        name = _string(pair[0], f"{where}.0", problems)
        field_value = _string(pair[1], f"{where}.1", problems)
        if name is not None and field_value is not None:
            pairs.append((name, field_value))
    if len(problems.found) > before:
        return None
    total = 0
    for index, (name, field_value) in enumerate(pairs):
        if not is_token(name):
            problems.add("headers", f"header {index}: name is not a token (RFC 9110 §5.1)")
            return None
        if not valid_field_value(field_value):
            problems.add(
                "headers",
                f"header {index} ({name}): value contains CR, LF, NUL or another control "
                "character (RFC 9110 §5.5)",
            )
            return None
        total += len(name) + len(field_value) + 4
    if total > MAX_HEADER_BYTES:
        problems.add("headers", f"headers exceed {MAX_HEADER_BYTES} bytes")
        return None
    return tuple(pairs)
