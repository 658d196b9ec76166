"""Reading ``apiProperties.json``: connection parameters, parameter sets, policy templates.

The file is the Power Platform's description of how a connection authenticates
(``connectionParameters``, or several ways in ``connectionParameterSets``) and what runs
around each request (``policyTemplateInstances``, ``scriptOperations``). What Backhaul cannot
run becomes a warning in the import result; nothing is dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from relay import policies as policy_rules
from relay.importer import jsondoc
from relay.importer.errors import DefinitionError
from relay.importer.openapi import ApiDocument
from relay.importer.settings import (
    AuthType,
    ExistsAction,
    OAuthSettings,
    Operation,
    Parameter,
    ParameterSet,
    ParameterType,
    Policy,
    Role,
)
from relay.oauth import providers

SUPPORTED_TEMPLATES = ("setheader", "setqueryparameter", "dynamichosturl", "routerequesttoendpoint")
_PARAMETER_TYPES: dict[str, ParameterType] = {
    "string": "string",
    "securestring": "securestring",
    "int": "int",
    "integer": "int",
    "bool": "bool",
    "boolean": "bool",
}
_GATEWAY_AUTH: dict[str, AuthType] = {
    "anonymous": "none",
    "none": "none",
    "basic": "basic",
    "windows": "windows",
}
_USERNAMES = {"username", "user", "userid", "login", "account"}
_PASSWORDS = {"password", "pwd", "pass", "passwd"}
_API_KEYS = {"apikey", "key", "apitoken", "xapikey", "subscriptionkey", "token"}


@dataclass
class OAuthOverride:
    """Client registration given in the import request (never in the files)."""

    client_id: str | None = None
    has_client_secret: bool = False


def _compact(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def properties_of(api_properties: dict[str, Any] | None) -> dict[str, Any]:
    """The ``properties`` object (files sometimes omit the wrapper)."""
    if not api_properties:
        return {}
    inner = jsondoc.get(api_properties, "properties")
    return inner if isinstance(inner, dict) else api_properties


# -- parameters ------------------------------------------------------------------------------


def _allowed(raw: dict[str, Any]) -> list[Any] | None:
    ui = jsondoc.obj(raw, "uiDefinition")
    for source in (
        jsondoc.get(raw, "allowedValues"),
        jsondoc.get(jsondoc.obj(ui, "constraints"), "allowedValues"),
    ):
        if isinstance(source, list) and source:
            return [jsondoc.get(v, "value", v) if isinstance(v, dict) else v for v in source]
    return None


def _parameter(name: str, raw: dict[str, Any], ptype: ParameterType) -> Parameter:
    ui = jsondoc.obj(raw, "uiDefinition")
    constraints = jsondoc.obj(ui, "constraints")
    description = jsondoc.text(jsondoc.get(ui, "description")) or jsondoc.text(
        jsondoc.get(ui, "displayName")
    )
    default = jsondoc.get(raw, "defaultValue", jsondoc.get(raw, "default"))
    return Parameter(
        name=name,
        type=ptype,
        required=jsondoc.truthy(jsondoc.get(constraints, "required"), False),
        description=description,
        default=default if isinstance(default, str | int | float | bool) else None,
        allowed_values=_allowed(raw),
    )


def _with_role(
    params: list[Parameter], role: Role, names: set[str], secret: bool
) -> list[Parameter]:
    """Mark the parameter that carries ``role``, adding one when the file declares none."""
    chosen = next((p for p in params if _compact(p.name) in names and p.role is None), None)
    if chosen is None and role == "api_key":
        secrets = [p for p in params if p.secret and p.role is None]
        chosen = secrets[0] if len(secrets) == 1 else None
    if chosen is None:
        name = {"username": "username", "password": "password", "api_key": "api_key"}[role]
        ptype: ParameterType = "securestring" if secret else "string"
        return [*params, Parameter(name=name, type=ptype, required=True, role=role)]
    marked = chosen.model_copy(update={"role": role, "required": True})
    return [marked if p is chosen else p for p in params]


def _allow_sharing(*sources: Any) -> bool:
    for source in sources:
        if not isinstance(source, dict):
            continue
        for holder in (
            source,
            jsondoc.obj(source, "metadata"),
            jsondoc.obj(source, "uiDefinition"),
        ):
            value = jsondoc.get(holder, "allowSharing")
            if value is not None:
                return jsondoc.truthy(value, True)
    return True


def parameter_set(
    name: str,
    display_name: str | None,
    raw_params: dict[str, Any],
    allow_sharing: bool,
    api: ApiDocument,
    oauth: OAuthOverride,
    where: str,
    warnings: list[str],
) -> ParameterSet:
    """One way to authenticate, from its parameters and the document's security scheme."""
    params: list[Parameter] = []
    oauth_raw: dict[str, Any] | None = None
    needs_gateway = False
    gateway_auth: list[AuthType] = []
    for pname, raw in raw_params.items():
        if not isinstance(raw, dict):
            warnings.append(f"{where}.{pname}: not an object; ignored")
            continue
        kind = str(jsondoc.get(raw, "type", "string")).strip().lower()
        if kind == "oauthsetting":
            if oauth_raw is not None:
                warnings.append(f"{where}.{pname}: a second oauthSetting is ignored")
                continue
            oauth_raw = jsondoc.obj(raw, "oAuthSettings")
            continue
        if kind == "gatewaysetting":
            needs_gateway = True
            continue
        if _compact(pname) == "authtype" and _allowed(raw):
            for value in _allowed(raw) or []:
                mapped = _GATEWAY_AUTH.get(str(value).strip().lower())
                if mapped is None:
                    warnings.append(f"{where}.{pname}: authentication {value!r} is not supported")
                elif mapped not in gateway_auth:
                    gateway_auth.append(mapped)
            continue
        ptype = _PARAMETER_TYPES.get(kind)
        if ptype is None:
            warnings.append(
                f"{where}.{pname}: parameter type {kind!r} is not supported; the parameter is "
                "not asked for"
            )
            continue
        params.append(_parameter(pname, raw, ptype))

    auth: AuthType = "none"
    api_key_name: str | None = None
    api_key_in: Any = None
    settings: OAuthSettings | None = None
    scheme = api.security
    if oauth_raw is not None:
        auth = "oauth2"
        urls: tuple[str | None, str | None, str | None] = (None, None, None)
        if scheme is not None and scheme.kind == "oauth2":
            urls = (scheme.authorization_url, scheme.token_url, scheme.refresh_url)
        settings = providers.resolve(
            oauth_raw,
            f"{where}.oAuthSettings",
            document_urls=urls,
            document_scopes=scheme.scopes if scheme is not None else None,
            client_id=oauth.client_id,
            has_client_secret=oauth.has_client_secret,
            warnings=warnings,
        )
    elif gateway_auth:
        auth = gateway_auth[0]
        if len(gateway_auth) > 1:
            others = ", ".join(gateway_auth[1:])
            warnings.append(
                f"{where}.authType: {auth} is used; the other choices ({others}) need a "
                "connector of their own"
            )
    elif scheme is not None:
        if scheme.kind == "basic":
            auth = "basic"
        elif scheme.kind in ("api_key", "bearer"):
            auth = "api_key"
            api_key_name, api_key_in = scheme.api_key_name, scheme.api_key_in
            if scheme.kind == "bearer":
                warnings.append(
                    f"security scheme {scheme.name}: HTTP bearer is sent as an API key in the "
                    'Authorization header; the connection\'s key must include "Bearer "'
                )
        else:
            auth = "oauth2"
            settings = providers.resolve(
                {},
                f"security scheme {scheme.name}",
                document_urls=(scheme.authorization_url, scheme.token_url, scheme.refresh_url),
                document_scopes=scheme.scopes,
                client_id=oauth.client_id,
                has_client_secret=oauth.has_client_secret,
                warnings=warnings,
            )
    if auth in ("basic", "windows"):
        params = _with_role(params, "username", _USERNAMES, secret=False)
        params = _with_role(params, "password", _PASSWORDS, secret=True)
    elif auth == "api_key":
        params = _with_role(params, "api_key", _API_KEYS, secret=True)
    return ParameterSet(
        name=name,
        display_name=display_name,
        auth_type=auth,
        api_key_name=api_key_name,
        api_key_in=api_key_in,
        needs_gateway=needs_gateway or auth == "windows",
        allow_sharing=allow_sharing,
        parameters=params,
        oauth=settings,
    )


def parameter_sets(
    props: dict[str, Any], api: ApiDocument, oauth: OAuthOverride, warnings: list[str]
) -> list[ParameterSet]:
    sets_raw = jsondoc.obj(props, "connectionParameterSets")
    values = [v for v in jsondoc.items(sets_raw, "values") if isinstance(v, dict)]
    single = jsondoc.obj(props, "connectionParameters")
    if values:
        if single:
            warnings.append(
                "connectionParameters: ignored because connectionParameterSets is present"
            )
        out = []
        for index, value in enumerate(values):
            name = jsondoc.text(jsondoc.get(value, "name")) or f"set{index + 1}"
            display = jsondoc.text(jsondoc.get(jsondoc.obj(value, "uiDefinition"), "displayName"))
            out.append(
                parameter_set(
                    name,
                    display,
                    jsondoc.obj(value, "parameters"),
                    _allow_sharing(value),
                    api,
                    oauth,
                    f"connectionParameterSets.values[{index}].parameters",
                    warnings,
                )
            )
        return out
    return [
        parameter_set(
            "default",
            None,
            single,
            _allow_sharing(props),
            api,
            oauth,
            "connectionParameters",
            warnings,
        )
    ]


# -- policies --------------------------------------------------------------------------------


def _policy_key(key: str) -> str:
    low = key.strip().lower()
    for prefix in ("x-ms-apimtemplateparameter.", "x-ms-apimtemplate-"):
        if low.startswith(prefix):
            return low[len(prefix) :]
    return low


def _operations(value: Any) -> list[str] | None:
    if isinstance(value, str) and value.strip():
        return [value.strip()]
    if isinstance(value, list):
        names = [str(v).strip() for v in value if str(v).strip()]
        return names or None
    return None


def policies(
    props: dict[str, Any],
    operations: list[Operation],
    sets: list[ParameterSet],
    gateway: bool,
    warnings: list[str],
) -> list[Policy]:
    instances = jsondoc.get(props, "policyTemplateInstances") or []
    if not isinstance(instances, list):
        warnings.append("policyTemplateInstances: not a list; no policy is applied")
        return []
    known_ops = {op.operation_id for op in operations if op.operation_id}
    declared = {p.name: p for s in sets for p in s.parameters}
    out: list[Policy] = []
    for index, raw in enumerate(instances):
        where = f"policyTemplateInstances[{index}]"
        if not isinstance(raw, dict):
            warnings.append(f"{where}: not an object; ignored")
            continue
        template = str(jsondoc.get(raw, "templateId", "")).strip().lower()
        title = jsondoc.text(jsondoc.get(raw, "title"))
        label = f"{where} ({template or 'no templateId'}{f': {title}' if title else ''})"
        params_raw = jsondoc.get(raw, "parameters")
        params = (
            {_policy_key(str(k)): v for k, v in params_raw.items()}
            if isinstance(params_raw, dict)
            else {}
        )
        if template not in SUPPORTED_TEMPLATES:
            warnings.append(f"{label}: policy template {template!r} is not supported; not applied")
            continue
        policy = _policy(template, title, params, label, gateway, warnings)
        if policy is None:
            continue
        for op in policy.operations or []:
            if op not in known_ops:
                warnings.append(f"{label}: operation {op!r} is not in the definition")
        texts = [
            t for t in (policy.value, policy.url_template, policy.new_path, policy.http_method) if t
        ]
        for text in texts:
            for expr in policy_rules.unsupported_expressions(text):
                warnings.append(f"{label}: expression {expr} is not supported; sent as written")
            for name in policy_rules.referenced_parameters(text):
                param = declared.get(name)
                if param is None:
                    warnings.append(f"{label}: connection parameter {name!r} is not declared")
                elif param.secret and gateway:
                    warnings.append(
                        f"{label}: {name!r} is a securestring; a gateway connection's secrets "
                        "are sealed to the gateway, so the relay substitutes an empty value"
                    )
        out.append(policy)
    return out


def _policy(
    template: str,
    title: str | None,
    params: dict[str, Any],
    label: str,
    gateway: bool,
    warnings: list[str],
) -> Policy | None:
    operations = _operations(params.get("operationname"))
    section = str(params.get("policysection") or "Request").strip().lower()
    if template in ("setheader", "setqueryparameter"):
        name = jsondoc.text(params.get("name"))
        if name is None:
            warnings.append(f"{label}: no name; not applied")
            return None
        if section != "request":
            warnings.append(f"{label}: only the Request section is applied; not applied")
            return None
        if template == "setheader" and not policy_rules.is_token(name):
            warnings.append(f"{label}: {name!r} is not a valid header name; not applied")
            return None
        action = str(params.get("existsaction") or "override").strip().lower()
        if action not in ("override", "skip", "append"):
            warnings.append(f"{label}: existsAction {action!r} is unknown; override is used")
            action = "override"
        exists: ExistsAction = action  # type: ignore[assignment]
        value = params.get("value")
        return Policy(
            template=template,  # type: ignore[arg-type]
            title=title,
            name=name,
            value="" if value is None else str(value),
            exists_action=exists,
            operations=operations,
        )
    if template == "dynamichosturl":
        url = jsondoc.text(params.get("urltemplate"))
        if url is None:
            warnings.append(f"{label}: no urlTemplate; not applied")
            return None
        if operations is not None and gateway:
            warnings.append(
                f"{label}: a per-operation host is not possible through a gateway (the base URL "
                "is sealed with the credentials); not applied"
            )
            return None
        return Policy(
            template="dynamichosturl", title=title, url_template=url, operations=operations
        )
    new_path = jsondoc.text(params.get("newpath"))
    if new_path is None:
        warnings.append(f"{label}: no newPath; not applied")
        return None
    if "://" in new_path or new_path.startswith("//"):
        warnings.append(
            f"{label}: newPath {new_path!r} names another host; a route must stay under the "
            "connector's base URL; not applied"
        )
        return None
    method = jsondoc.text(params.get("httpmethod"))
    if method is not None and method.lower() == "@request.originalhttpmethod":
        method = None
    if method is not None and not method.startswith("@") and not policy_rules.is_token(method):
        raise DefinitionError(f"{label}: httpMethod {method!r} is not an HTTP method")
    return Policy(
        template="routerequesttoendpoint",
        title=title,
        new_path=new_path,
        http_method=method.upper() if method and not method.startswith("@") else method,
        operations=operations,
    )
