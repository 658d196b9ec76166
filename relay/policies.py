"""Policy templates of imported connectors, applied by the relay to each invoke.

Power Platform connectors declare small request transformations in ``apiProperties.json``
(``policyTemplateInstances``). The relay runs four of them, in the order they are listed,
before the request leaves it (towards the API for online connectors, into the tunnel's OPEN
head for gateway connectors):

``setheader``               set, keep or add a request header (``existsAction``)
``setqueryparameter``       the same for a query parameter
``routerequesttoendpoint``  send the operation to another path (and method) under the base URL
``dynamichosturl``          send the request to a host built from connection parameters

Values may contain expressions: ``@connectionParameters('name'[, 'default'])``,
``@headers('name')``, ``@queryParameters('name')`` and ``@Request.OriginalHTTPMethod``; a
route's new path may also name the operation's path parameters (``/v2/items/{id}``).

A rewrite can never leave the connector's base URL: a new path with dot segments or encoded
slashes is refused (:class:`PolicyError`) rather than sent. ``dynamichosturl`` does change the
host; for a gateway connector it is computed once per connection, sealed into the connection's
credentials as its base URL, and the agent's allow-list still decides whether that host may be
reached.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from relay import RelayError
from relay.importer.settings import Operation, Policy
from relay.request_parts import RequestParts
from relay.urls import normalize_base_url

_EXPRESSION = re.compile(
    r"@(?P<name>[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)*)(?P<call>\((?P<args>[^()]*)\))?"
)
_ARG = re.compile(r"'((?:[^']|'')*)'")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FORBIDDEN_PATH = re.compile(r"%(2f|5c|00)|\\", re.IGNORECASE)
SUPPORTED_EXPRESSIONS = frozenset(
    {"connectionparameters", "headers", "queryparameters", "request.originalhttpmethod"}
)


class PolicyError(RelayError):
    """A policy would produce a request the relay refuses to send (names the policy)."""


@dataclass(frozen=True)
class Expression:
    name: str
    args: tuple[str, ...]
    text: str


def expressions(text: str) -> list[Expression]:
    found = []
    for match in _EXPRESSION.finditer(text):
        args = tuple(a.replace("''", "'") for a in _ARG.findall(match.group("args") or ""))
        found.append(Expression(match.group("name").lower(), args, match.group(0)))
    return found


def unsupported_expressions(text: str) -> list[str]:
    return [e.text for e in expressions(text) if e.name not in SUPPORTED_EXPRESSIONS]


def referenced_parameters(text: str) -> list[str]:
    return [e.args[0] for e in expressions(text) if e.name == "connectionparameters" and e.args]


def is_token(text: str) -> bool:
    return bool(_TOKEN.match(text))


@dataclass(frozen=True)
class Scope:
    """What expressions may read: the connection's parameters and the original request."""

    parameters: Mapping[str, Any]
    original: RequestParts
    path_params: Mapping[str, str]

    def header(self, name: str) -> str:
        low = name.lower()
        return next((v for k, v in self.original.headers if k.lower() == low), "")

    def query_param(self, name: str) -> str:
        pairs = parse_qsl(self.original.query, keep_blank_values=True)
        return next((v for k, v in pairs if k == name), "")


def evaluate(text: str, scope: Scope) -> str:
    """Replace every supported expression in ``text``; others stay as written."""

    def one(match: re.Match[str]) -> str:
        name = match.group("name").lower()
        args = [a.replace("''", "'") for a in _ARG.findall(match.group("args") or "")]
        if name == "connectionparameters" and args:
            value = scope.parameters.get(args[0])
            if value is None or value == "":
                return args[1] if len(args) > 1 else ""
            return str(value).lower() if isinstance(value, bool) else str(value)
        if name == "headers" and args:
            return scope.header(args[0])
        if name == "queryparameters" and args:
            return scope.query_param(args[0])
        if name == "request.originalhttpmethod":
            return scope.original.method
        return match.group(0)

    return _EXPRESSION.sub(one, text)


# -- operations ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _template(path: str) -> tuple[re.Pattern[str], int, tuple[str, ...]]:
    names: list[str] = []
    pattern = ""
    literal = 0
    for part in re.split(r"(\{[^{}/]+\})", path):
        if part.startswith("{") and part.endswith("}"):
            names.append(part[1:-1])
            pattern += f"(?P<p{len(names) - 1}>[^/]+)"
        else:
            pattern += re.escape(part)
            literal += len(part)
    return re.compile(pattern + "/?"), literal, tuple(names)


def match_operation(
    operations: Sequence[Operation], method: str, path: str
) -> tuple[Operation | None, dict[str, str]]:
    """The declared operation a request is for, and its path parameters (raw)."""
    target = "/" + path
    best: tuple[int, Operation, dict[str, str]] | None = None
    for op in operations:
        if op.method != method.upper():
            continue
        regex, literal, names = _template(op.path)
        match = regex.fullmatch(target)
        if match is None:
            continue
        if best is None or literal > best[0]:
            params = {names[i]: match.group(f"p{i}") for i in range(len(names))}
            best = (literal, op, params)
    if best is None:
        return None, {}
    return best[1], best[2]


# -- applying --------------------------------------------------------------------------------


def applies(policy: Policy, operation: Operation | None) -> bool:
    if policy.operations is None:
        return True
    return operation is not None and operation.operation_id in policy.operations


def host_base_url(value: str, base_path: str, title: str) -> str:
    """The base URL ``dynamichosturl`` produced: its scheme and host, then the base path."""
    value = value.strip()
    if "://" not in value:
        value = "https://" + value
    parts = urlsplit(value)
    path = parts.path.rstrip("/") + (base_path if base_path.startswith("/") else "/" + base_path)
    try:
        return normalize_base_url(urlunsplit((parts.scheme, parts.netloc, path, "", "")))
    except ValueError as exc:
        raise PolicyError(f"policy {title}: the host URL {value!r} {exc}") from None


def _check_path(path: str, title: str) -> str:
    path = path.lstrip("/")
    if _FORBIDDEN_PATH.search(path):
        raise PolicyError(f"policy {title}: the new path has encoded slashes or backslashes")
    for segment in path.split("/"):
        if unquote(segment) in (".", ".."):
            raise PolicyError(f"policy {title}: the new path would leave the base URL")
    return path


def _new_path(policy: Policy, scope: Scope) -> str:
    template = policy.new_path or ""

    def param(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in scope.path_params:
            return scope.path_params[name]
        raise PolicyError(f"policy {policy.title or policy.template}: no path parameter {name!r}")

    with_params = re.sub(r"\{([^{}/]+)\}", param, template)
    pieces = []
    last = 0
    for match in _EXPRESSION.finditer(with_params):
        pieces.append(with_params[last : match.start()])
        pieces.append(quote(evaluate(match.group(0), scope), safe="/-._~"))
        last = match.end()
    pieces.append(with_params[last:])
    return "".join(pieces)


def _set_header(parts: RequestParts, policy: Policy, scope: Scope) -> RequestParts:
    name = policy.name or ""
    value = evaluate(policy.value or "", scope)
    if any(c in value for c in "\r\n\x00"):
        raise PolicyError(f"policy {policy.title or 'setheader'}: the value has CR, LF or NUL")
    present = any(k.lower() == name.lower() for k, _ in parts.headers)
    if policy.exists_action == "skip" and present:
        return parts
    headers = list(parts.headers)
    if policy.exists_action == "override":
        headers = [(k, v) for k, v in headers if k.lower() != name.lower()]
    headers.append((name.lower(), value))
    return replace(parts, headers=tuple(headers))


def _set_query(parts: RequestParts, policy: Policy, scope: Scope) -> RequestParts:
    name = policy.name or ""
    value = evaluate(policy.value or "", scope)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    present = any(k == name for k, _ in pairs)
    if policy.exists_action == "skip" and present:
        return parts
    if policy.exists_action == "override":
        pairs = [(k, v) for k, v in pairs if k != name]
    pairs.append((name, value))
    return replace(parts, query=urlencode(pairs, quote_via=quote, safe=""))


def apply(
    policies: Sequence[Policy],
    operations: Sequence[Operation],
    parts: RequestParts,
    parameters: Mapping[str, Any],
    base_path: str,
    *,
    host_per_request: bool,
) -> RequestParts:
    """Run the policies on one request; ``host_per_request`` allows operation-scoped hosts.

    A ``dynamichosturl`` that applies to every operation is resolved once per connection
    (:func:`connection_base_url`) and skipped here; one scoped to some operations changes the
    host per request, which only an online connector allows.
    """
    operation, path_params = match_operation(operations, parts.method, parts.path)
    scope = Scope(parameters, parts, path_params)
    for policy in policies:
        if not applies(policy, operation):
            continue
        title = policy.title or policy.template
        if policy.template == "setheader":
            parts = _set_header(parts, policy, scope)
        elif policy.template == "setqueryparameter":
            parts = _set_query(parts, policy, scope)
        elif policy.template == "routerequesttoendpoint":
            path = _check_path(_new_path(policy, scope), title)
            method = parts.method
            if policy.http_method:
                method = evaluate(policy.http_method, scope).upper()
                if not is_token(method):
                    raise PolicyError(f"policy {title}: {method!r} is not an HTTP method")
            parts = replace(parts, path=path, method=method)
        elif policy.template == "dynamichosturl" and policy.operations is not None:
            if host_per_request:
                value = evaluate(policy.url_template or "", scope)
                parts = replace(parts, base_url=host_base_url(value, base_path, title))
    return parts


def connection_base_url(
    policies: Sequence[Policy], parameters: Mapping[str, Any], base_path: str
) -> str | None:
    """The base URL an all-operations ``dynamichosturl`` gives a connection (or None)."""
    for policy in policies:
        if policy.template == "dynamichosturl" and policy.operations is None:
            empty = RequestParts("GET", "", "", (), "")
            value = evaluate(policy.url_template or "", Scope(parameters, empty, {}))
            return host_base_url(value, base_path, policy.title or policy.template)
    return None
