"""The OpenAPI document of one connection: the connector's operations, served by the relay.

``GET /v1/connections/{id}/openapi.json`` answers an OpenAPI 3.0 document whose server is the
connection's invoke URL and whose only security scheme is the relay's bearer token, so a
client generated from it calls the relay unchanged. The operations are the connector's own:
an OpenAPI 3 definition keeps its paths and schemas; an OpenAPI 2.0 definition is converted
(body and form parameters become request bodies, ``definitions`` become
``components.schemas``, ``$ref``s follow). What the connection supplies itself — its API key
parameter, headers and query parameters set by policies — is removed from the operations, since
a caller cannot and need not send it.

A connector created by hand has no definition; its document has one pass-through path.
"""

from __future__ import annotations

import copy
from typing import Any

from relay.importer.openapi import METHODS
from relay.importer.settings import ConnectorSettings

BEARER = "backhaulBearer"


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/definitions/"):
                out[key] = "#/components/schemas/" + value[len("#/definitions/") :]
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def _resolve(doc: dict[str, Any], node: Any, section: str) -> Any:
    """Inline a ``#/parameters/…`` or ``#/responses/…`` reference (OpenAPI 2.0)."""
    if isinstance(node, dict) and isinstance(node.get("$ref"), str):
        prefix = f"#/{section}/"
        ref = node["$ref"]
        if ref.startswith(prefix):
            found = doc.get(section, {}).get(ref[len(prefix) :])
            if isinstance(found, dict):
                return found
    return node


_SCHEMA_KEYS = (
    "type",
    "format",
    "items",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
)


def _v2_operation(doc: dict[str, Any], op: dict[str, Any], shared: list[Any]) -> dict[str, Any]:
    out = {
        k: v
        for k, v in op.items()
        if k not in ("parameters", "responses", "consumes", "produces", "security", "schemes")
    }
    consumes = op.get("consumes") or doc.get("consumes") or ["application/json"]
    produces = op.get("produces") or doc.get("produces") or ["application/json"]
    parameters: list[dict[str, Any]] = []
    form: dict[str, Any] = {}
    required_form: list[str] = []
    for raw in [*shared, *(op.get("parameters") or [])]:
        param = _resolve(doc, raw, "parameters")
        if not isinstance(param, dict):
            continue
        where = param.get("in")
        if where == "body":
            out["requestBody"] = {
                "required": bool(param.get("required")),
                "content": {str(consumes[0]): {"schema": param.get("schema", {})}},
            }
            if param.get("description"):
                out["requestBody"]["description"] = param["description"]
        elif where == "formData":
            form[str(param.get("name"))] = {k: param[k] for k in _SCHEMA_KEYS if k in param}
            if param.get("type") == "file":
                form[str(param.get("name"))] = {"type": "string", "format": "binary"}
            if param.get("required"):
                required_form.append(str(param.get("name")))
        elif where in ("query", "header", "path"):
            converted = {
                k: param[k]
                for k in param
                if k not in _SCHEMA_KEYS and k not in ("collectionFormat", "allowEmptyValue")
            }
            converted["schema"] = {k: param[k] for k in _SCHEMA_KEYS if k in param}
            parameters.append(converted)
    if form:
        kind = (
            "multipart/form-data"
            if "multipart/form-data" in consumes
            or any(v.get("format") == "binary" for v in form.values())
            else "application/x-www-form-urlencoded"
        )
        schema: dict[str, Any] = {"type": "object", "properties": form}
        if required_form:
            schema["required"] = required_form
        out["requestBody"] = {"content": {kind: {"schema": schema}}}
    if parameters:
        out["parameters"] = parameters
    responses: dict[str, Any] = {}
    for code, raw in (op.get("responses") or {"default": {"description": "response"}}).items():
        response = _resolve(doc, raw, "responses")
        if not isinstance(response, dict):
            continue
        converted = {"description": str(response.get("description") or "response")}
        if "schema" in response:
            converted["content"] = {str(produces[0]): {"schema": response["schema"]}}
        if isinstance(response.get("headers"), dict):
            converted["headers"] = {
                name: {"schema": {k: h[k] for k in _SCHEMA_KEYS if k in h}}
                for name, h in response["headers"].items()
                if isinstance(h, dict)
            }
        responses[str(code)] = converted
    out["responses"] = responses
    return out


def _from_v2(doc: dict[str, Any]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, item in (doc.get("paths") or {}).items():
        if not isinstance(item, dict) or "$ref" in item:
            continue
        shared = item.get("parameters") or []
        converted = {
            method.lower(): _v2_operation(doc, op, shared)
            for method, op in item.items()
            if isinstance(op, dict) and method.lower() in METHODS
        }
        if converted:
            paths[path] = converted
    components: dict[str, Any] = {}
    if isinstance(doc.get("definitions"), dict):
        components["schemas"] = doc["definitions"]
    result: dict[str, Any] = _rewrite_refs({"paths": paths, "components": components})
    return result


def _supplied(
    settings: ConnectorSettings, auth_type: str, set_name: str | None
) -> set[tuple[str, str]]:
    """(in, name) of parameters the connection or its policies supply."""
    supplied: set[tuple[str, str]] = set()
    pset = settings.parameter_set(set_name)
    if pset is not None and auth_type == "api_key" and pset.api_key_name and pset.api_key_in:
        supplied.add((pset.api_key_in, pset.api_key_name.lower()))
    for policy in settings.policies:
        if policy.operations is None and policy.exists_action == "override" and policy.name:
            where = "header" if policy.template == "setheader" else "query"
            if policy.template in ("setheader", "setqueryparameter"):
                supplied.add((where, policy.name.lower()))
    return supplied


def _strip_supplied(paths: dict[str, Any], supplied: set[tuple[str, str]]) -> None:
    for item in paths.values():
        if not isinstance(item, dict):
            continue
        for key, op in list(item.items()):
            if not isinstance(op, dict):
                continue
            if key == "parameters" or key.lower() in METHODS:
                params = op if key == "parameters" else op.get("parameters")
                if isinstance(params, list):
                    kept = [
                        p
                        for p in params
                        if not (
                            isinstance(p, dict)
                            and (str(p.get("in")), str(p.get("name", "")).lower()) in supplied
                        )
                    ]
                    if key == "parameters":
                        item[key] = kept
                    else:
                        op["parameters"] = kept
            if key.lower() in METHODS:
                op.pop("security", None)


def _passthrough() -> dict[str, Any]:
    operation = {
        "summary": "Call the API under the connector's base URL",
        "parameters": [
            {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "responses": {"default": {"description": "the API's response"}},
    }
    methods = ("get", "put", "post", "delete", "patch", "head", "options")
    return {
        "paths": {"/{path}": {m: {**operation, "operationId": f"{m}Path"} for m in methods}},
        "components": {},
    }


def build(
    connection_id: str,
    connection_name: str | None,
    auth_type: str,
    parameter_set: str | None,
    settings: ConnectorSettings | None,
    definition: dict[str, Any] | None,
    invoke_url: str,
) -> dict[str, Any]:
    if settings is None or definition is None:
        body = _passthrough()
        info: dict[str, Any] = {"title": connection_name or connection_id, "version": "1.0"}
    elif settings.source == "openapi3":
        source = copy.deepcopy(definition)
        body = {"paths": source.get("paths") or {}, "components": source.get("components") or {}}
        info = dict(source.get("info") or {})
    else:
        body = _from_v2(copy.deepcopy(definition))
        info = dict(definition.get("info") or {})
    if settings is not None:
        _strip_supplied(body["paths"], _supplied(settings, auth_type, parameter_set))
    components = dict(body["components"])
    components["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "A Backhaul API token (bh_...) of a user who may use this connection",
        }
    }
    info.setdefault("title", connection_name or connection_id)
    info.setdefault("version", "1.0")
    return {
        "openapi": "3.0.3",
        "info": info,
        "servers": [{"url": invoke_url}],
        "security": [{BEARER: []}],
        "paths": body["paths"],
        "components": components,
        "x-backhaul-connection": connection_id,
    }
