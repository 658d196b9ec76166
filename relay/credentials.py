"""What a connection stores: its parameter values and its credentials, protected.

A connection on an imported connector answers the parameters of one parameter set (by the
names in ``apiProperties.json``; ``credentials.username`` / ``password`` / ``api_key`` are
accepted too). The values are split three ways:

- the ones the auth scheme uses (username, password, API key) become the credentials;
- other ``securestring`` values are secrets policies may read;
- the rest (``string``, ``int``, ``bool``) are stored in clear for policies and the host URL.

Protection depends on who calls the API. Through a gateway, the credentials are sealed to the
gateway (:mod:`backhaul.seal`) under the connection's base URL, which a ``dynamichosturl``
policy may have changed; the relay can never read them. Online, the relay itself calls the
API, so the credentials and secrets are encrypted with the relay's key
(:mod:`relay.secretbox`); OAuth 2.0 connections start empty and get their tokens from the
consent round-trip (:mod:`relay.oauth`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from backhaul.seal import seal
from relay import policies
from relay.config import RelayConfig
from relay.importer import settings as connector_settings
from relay.importer.settings import Parameter
from relay.problems import ProblemError
from relay.secretbox import SUITE, SecretBoxError, box_for
from relay.store.models import Connector

PURPOSE = "connection-credentials"
NO_SECRETS = "none"
MAX_VALUE_BYTES = 16 * 1024
_ROLES = ("username", "password", "api_key")


@dataclass(frozen=True)
class Prepared:
    auth_type: str
    credentials: dict[str, Any]
    secrets: dict[str, str]
    parameter_set: str | None
    parameter_values: dict[str, Any] | None
    base_url: str | None


#: ASCII digits only: ``str.isdigit`` also takes "²" (which ``int`` refuses) and "٣" (which
#: ``int`` reads as 3).
_INTEGER = re.compile(r"-?[0-9]+")


def _invalid(detail: str) -> ProblemError:
    return ProblemError(422, "Invalid parameters", detail)


def _coerce(param: Parameter, value: Any) -> Any:
    where = f"parameters.{param.name}"
    if param.type in ("string", "securestring"):
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _invalid(f"{where}: must be a string")
        return str(value)
    if param.type == "int":
        if isinstance(value, bool):
            raise _invalid(f"{where}: must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            return int(value)
        raise _invalid(f"{where}: must be an integer")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _invalid(f"{where}: must be true or false")


def prepare(
    connector: Connector,
    credentials: dict[str, Any],
    parameters: dict[str, Any] | None,
    parameter_set: str | None,
) -> Prepared:
    """Check the request against the connector's parameter set; messages never hold values."""
    found = connector_settings.load(connector.settings)
    if found is None:
        if parameters or parameter_set is not None:
            raise _invalid(f"connector {connector.id} was not imported; give its credentials only")
        return Prepared(connector.auth_type, dict(credentials), {}, None, None, None)
    pset = found.parameter_set(parameter_set)
    if pset is None:
        names = ", ".join(s.name for s in found.parameter_sets)
        raise _invalid(f"parameter_set: {parameter_set!r} is not one of {names}")
    given = dict(parameters or {})
    for key, value in credentials.items():
        param = pset.by_role(key) if key in _ROLES else None  # type: ignore[arg-type]
        if param is None:
            raise _invalid(f"credentials.{key}: not used by auth type {pset.auth_type}")
        if param.name in given and given[param.name] != value:
            raise _invalid(f"credentials.{key}: also given as parameters.{param.name}")
        given[param.name] = value
    for name in given:
        if pset.parameter(name) is None:
            raise _invalid(f"parameters.{name}: not a parameter of set {pset.name!r}")
    values: dict[str, Any] = {}
    for param in pset.parameters:
        if param.name in given and given[param.name] is not None:
            value = _coerce(param, given[param.name])
        elif param.default is not None:
            value = param.default
        elif param.required:
            raise _invalid(f"parameters.{param.name}: required by set {pset.name!r}")
        else:
            continue
        if param.allowed_values is not None and value not in param.allowed_values:
            raise _invalid(f"parameters.{param.name}: not one of the allowed values")
        values[param.name] = value
    if sum(len(str(v).encode()) for v in values.values()) > MAX_VALUE_BYTES:
        raise _invalid(f"parameters: larger than {MAX_VALUE_BYTES} bytes")
    present = [p for p in pset.parameters if p.name in values]
    creds: dict[str, Any] = {p.role: values[p.name] for p in present if p.role}
    secrets = {p.name: values[p.name] for p in present if p.secret and not p.role}
    plain = {p.name: values[p.name] for p in present if not p.secret and not p.role}
    try:
        base_url = policies.connection_base_url(found.policies, plain, found.base_path)
    except policies.PolicyError as exc:
        raise _invalid(str(exc)) from None
    return Prepared(
        auth_type=pset.auth_type,
        credentials=creds,
        secrets=secrets if connector.gateway_id is None else {},
        parameter_set=pset.name,
        parameter_values=plain,
        base_url=base_url if base_url != connector.base_url else None,
    )


def protect(
    config: RelayConfig,
    connector: Connector,
    gateway_key: str | None,
    connection_id: str,
    prepared: Prepared,
    clean: dict[str, str],
) -> tuple[str, bytes]:
    """``(suite, blob)`` to store: sealed to the gateway, or encrypted with the relay's key."""
    base_url = prepared.base_url or connector.base_url
    if connector.gateway_id is not None:
        assert gateway_key is not None
        return seal(gateway_key, connection_id, base_url, clean)
    if not clean and not prepared.secrets:
        return NO_SECRETS, b""
    try:
        box = box_for(config)
    except SecretBoxError as exc:
        raise ProblemError(503, "Relay secret key missing", str(exc)) from None
    return SUITE, box.seal(
        PURPOSE, connection_id, {"credentials": clean, "secrets": prepared.secrets}
    )


def open_online(config: RelayConfig, connection_id: str, suite: str, blob: bytes) -> dict[str, Any]:
    """The relay-encrypted credentials and secrets of an online connection."""
    if suite == NO_SECRETS or not blob:
        return {"credentials": {}, "secrets": {}}
    if suite != SUITE:
        raise ProblemError(
            502, "Credentials unusable", f"connection {connection_id} is sealed to a gateway"
        )
    try:
        doc = box_for(config).open(PURPOSE, connection_id, blob)
    except SecretBoxError as exc:
        raise ProblemError(502, "Credentials unusable", str(exc)) from None
    return dict(doc)
