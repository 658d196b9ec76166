"""Reading an API document: OpenAPI 2.0 (``swagger``) or OpenAPI 3.x (``openapi``).

Only what a connector needs: the base URL (``schemes`` + ``host`` + ``basePath``, or the
first of ``servers``), the security scheme a connection will use, and the operations
(method, path template, operationId) that policies and the per-connection document refer
to. Schemas are not validated: the API behind the connector is the authority on its bodies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from relay.importer import jsondoc
from relay.importer.errors import DefinitionError
from relay.importer.settings import Operation
from relay.urls import normalize_base_url

METHODS = ("get", "put", "post", "delete", "options", "head", "patch")
_VARIABLE = re.compile(r"\{([^{}]+)\}")

SchemeKind = Literal["basic", "api_key", "oauth2", "bearer"]


@dataclass
class SecurityScheme:
    """The one scheme a connection uses, as the document declares it."""

    name: str
    kind: SchemeKind
    api_key_name: str | None = None
    api_key_in: Literal["header", "query"] | None = None
    authorization_url: str | None = None
    token_url: str | None = None
    refresh_url: str | None = None
    scopes: list[str] = field(default_factory=list)


@dataclass
class ApiDocument:
    source: Literal["openapi2", "openapi3"]
    title: str
    base_url: str
    base_path: str
    security: SecurityScheme | None
    operations: list[Operation]
    warnings: list[str]


def read(doc: dict[str, Any], source: Literal["openapi2", "openapi3"]) -> ApiDocument:
    warnings: list[str] = []
    if source == "openapi2":
        version = str(jsondoc.get(doc, "swagger", "")).strip()
        if version != "2.0":
            raise DefinitionError(f'swagger: version must be "2.0" (got {version[:20]!r})')
        base_url, base_path = _base_v2(doc)
        schemes = jsondoc.obj(doc, "securityDefinitions")
    else:
        version = str(jsondoc.get(doc, "openapi", "")).strip()
        if not version.startswith("3."):
            raise DefinitionError(f"openapi: version must be 3.x (got {version[:20]!r})")
        base_url, base_path = _base_v3(doc, warnings)
        schemes = jsondoc.obj(jsondoc.obj(doc, "components"), "securitySchemes")
    title = jsondoc.text(jsondoc.get(jsondoc.obj(doc, "info"), "title")) or "Imported connector"
    security = _security(doc, schemes, source, warnings)
    operations = _operations(doc, warnings)
    return ApiDocument(source, title[:128], base_url, base_path, security, operations, warnings)


def _normalized(url: str, where: str) -> str:
    try:
        return normalize_base_url(url)
    except ValueError as exc:
        raise DefinitionError(f"{where}: the base URL {url!r} {exc}") from None


def _base_v2(doc: dict[str, Any]) -> tuple[str, str]:
    host = jsondoc.text(jsondoc.get(doc, "host"))
    if host is None:
        raise DefinitionError("host: missing; the connector needs the API's host name")
    if "/" in host or "://" in host:
        raise DefinitionError("host: must be a host name (and port), without scheme or path")
    schemes = [str(s).lower() for s in jsondoc.items(doc, "schemes") if isinstance(s, str)]
    scheme = "https" if "https" in schemes or not schemes else schemes[0]
    base_path = jsondoc.text(jsondoc.get(doc, "basePath")) or "/"
    if not base_path.startswith("/"):
        base_path = "/" + base_path
    base_url = _normalized(f"{scheme}://{host}{base_path}", "host/basePath")
    return base_url, base_path


def _base_v3(doc: dict[str, Any], warnings: list[str]) -> tuple[str, str]:
    servers = [s for s in jsondoc.items(doc, "servers") if isinstance(s, dict)]
    if not servers:
        raise DefinitionError("servers: missing; the connector needs the API's absolute URL")
    server = servers[0]
    url = jsondoc.text(jsondoc.get(server, "url")) or ""
    variables = jsondoc.obj(server, "variables")

    def default(match: re.Match[str]) -> str:
        value = jsondoc.get(jsondoc.obj(variables, match.group(1)), "default")
        if value is None:
            raise DefinitionError(f"servers[0].url: variable {{{match.group(1)}}} has no default")
        return str(value)

    url = _VARIABLE.sub(default, url)
    if "://" not in url:
        raise DefinitionError(
            f"servers[0].url: {url!r} is relative; Backhaul needs the API's absolute URL"
        )
    if len(servers) > 1:
        warnings.append(f"servers: {len(servers)} servers declared; the first ({url}) is used")
    base_url = _normalized(url, "servers[0].url")
    path = "/" + base_url.split("://", 1)[1].split("/", 1)[1]
    return base_url, path


def _security(
    doc: dict[str, Any],
    schemes: dict[str, Any],
    source: Literal["openapi2", "openapi3"],
    warnings: list[str],
) -> SecurityScheme | None:
    where = "securityDefinitions" if source == "openapi2" else "components.securitySchemes"
    order: list[str] = []
    for requirement in jsondoc.items(doc, "security"):
        if isinstance(requirement, dict):
            order += [name for name in requirement if name not in order]
    order += [name for name in schemes if name not in order]
    order = [name for name in order if isinstance(schemes.get(name), dict)]
    if not order:
        return None
    chosen = order[0]
    for other in order[1:]:
        warnings.append(
            f"{where}.{other}: not used; a connection authenticates with one scheme ({chosen})"
        )
    return _scheme(chosen, schemes[chosen], source, f"{where}.{chosen}")


def _scheme(
    name: str, raw: dict[str, Any], source: Literal["openapi2", "openapi3"], where: str
) -> SecurityScheme:
    kind = str(jsondoc.get(raw, "type", "")).strip().lower()
    if kind == "basic" and source == "openapi2":
        return SecurityScheme(name, "basic")
    if kind == "http":
        scheme = str(jsondoc.get(raw, "scheme", "")).strip().lower()
        if scheme == "basic":
            return SecurityScheme(name, "basic")
        if scheme == "bearer":
            return SecurityScheme(name, "bearer", "Authorization", "header")
        raise DefinitionError(f"{where}: HTTP scheme {scheme!r} is not supported")
    if kind == "apikey":
        key_name = jsondoc.text(jsondoc.get(raw, "name"))
        key_in = str(jsondoc.get(raw, "in", "header")).strip().lower()
        if key_name is None:
            raise DefinitionError(f"{where}: an apiKey scheme needs a name")
        if key_in not in ("header", "query"):
            raise DefinitionError(f"{where}: apiKey in {key_in!r} is not supported (header, query)")
        return SecurityScheme(
            name, "api_key", key_name, "header" if key_in == "header" else "query"
        )
    if kind == "oauth2":
        return _oauth_scheme(name, raw, source, where)
    raise DefinitionError(f"{where}: security scheme type {kind!r} is not supported")


def _oauth_scheme(
    name: str, raw: dict[str, Any], source: Literal["openapi2", "openapi3"], where: str
) -> SecurityScheme:
    if source == "openapi2":
        flow = str(jsondoc.get(raw, "flow", "accessCode")).strip()
        if flow.lower() != "accesscode":
            raise DefinitionError(
                f"{where}: OAuth 2.0 flow {flow!r} is not supported; use accessCode "
                "(authorization code with PKCE)"
            )
        source_flow = raw
    else:
        flows = jsondoc.obj(raw, "flows")
        source_flow = jsondoc.obj(flows, "authorizationCode")
        if not source_flow:
            names = ", ".join(sorted(flows)) or "none"
            raise DefinitionError(
                f"{where}: only the authorizationCode flow is supported (declared: {names})"
            )
    scopes = jsondoc.get(source_flow, "scopes") or {}
    return SecurityScheme(
        name,
        "oauth2",
        authorization_url=jsondoc.text(jsondoc.get(source_flow, "authorizationUrl")),
        token_url=jsondoc.text(jsondoc.get(source_flow, "tokenUrl")),
        refresh_url=jsondoc.text(jsondoc.get(source_flow, "refreshUrl")),
        scopes=[str(s) for s in scopes] if isinstance(scopes, dict | list) else [],
    )


def _operations(doc: dict[str, Any], warnings: list[str]) -> list[Operation]:
    paths = jsondoc.get(doc, "paths")
    if not isinstance(paths, dict):
        warnings.append("paths: missing; the connector has no operations, any path is passed on")
        return []
    operations: list[Operation] = []
    for path, item in paths.items():
        if not isinstance(path, str) or not path.startswith("/") or not isinstance(item, dict):
            warnings.append(f"paths.{path}: not a path item; skipped")
            continue
        if "$ref" in item:
            warnings.append(f"paths.{path}: $ref path items are not supported; skipped")
            continue
        for method, op in item.items():
            if not isinstance(method, str) or method.lower() not in METHODS:
                continue
            op_id = jsondoc.text(jsondoc.get(op, "operationId")) if isinstance(op, dict) else None
            operations.append(Operation(method=method.upper(), path=path, operation_id=op_id))
    return operations
