"""What the importer keeps from a definition: the shape stored in ``connectors.settings``.

Pydantic models so the JSON column round-trips with validation: a row written by an older
relay either loads or fails with the field's name, never half-loads.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

AuthType = Literal["none", "basic", "api_key", "oauth2", "windows"]
ParameterType = Literal["string", "securestring", "int", "bool"]
#: What a connection parameter is for, beyond being available to policy expressions.
Role = Literal["username", "password", "api_key"]
ExistsAction = Literal["override", "skip", "append"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Parameter(_Frozen):
    """One value a connection asks for (``connectionParameters`` entry)."""

    name: str
    type: ParameterType
    required: bool = False
    description: str | None = None
    default: Any = None
    allowed_values: list[Any] | None = None
    role: Role | None = None

    @property
    def secret(self) -> bool:
        return self.type == "securestring"

    def public(self) -> dict[str, Any]:
        """How the import result and the API describe the parameter."""
        doc: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "secret": self.secret,
        }
        if self.description:
            doc["description"] = self.description
        if self.default is not None:
            doc["default"] = self.default
        if self.allowed_values is not None:
            doc["allowed_values"] = self.allowed_values
        if self.role is not None:
            doc["used_for"] = self.role
        return doc


class OAuthSettings(_Frozen):
    """``oauthSetting`` (or an OpenAPI oauth2 scheme) resolved to what the relay needs."""

    identity_provider: str
    client_id: str
    scopes: list[str] = []
    authorization_url: str
    token_url: str
    refresh_url: str | None = None
    #: Entra ID v1 ("resource") instead of v2 scopes.
    resource: str | None = None
    #: Extra query parameters for the authorization request (customParameters).
    authorize_params: dict[str, str] = {}
    has_client_secret: bool = False


class ParameterSet(_Frozen):
    """One way to authenticate (a ``connectionParameterSets`` value, or the only one)."""

    name: str
    display_name: str | None = None
    auth_type: AuthType
    api_key_name: str | None = None
    api_key_in: Literal["header", "query"] | None = None
    needs_gateway: bool = False
    allow_sharing: bool = True
    parameters: list[Parameter] = []
    oauth: OAuthSettings | None = None

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)

    def by_role(self, role: Role) -> Parameter | None:
        return next((p for p in self.parameters if p.role == role), None)


class Policy(_Frozen):
    """A policy template instance the relay applies to requests."""

    template: Literal["setheader", "setqueryparameter", "dynamichosturl", "routerequesttoendpoint"]
    title: str | None = None
    name: str | None = None
    value: str | None = None
    exists_action: ExistsAction = "override"
    url_template: str | None = None
    new_path: str | None = None
    http_method: str | None = None
    #: operationIds it applies to; None means every operation.
    operations: list[str] | None = None


class Operation(_Frozen):
    method: str
    path: str
    operation_id: str | None = None


class ConnectorSettings(_Frozen):
    """Everything an imported connector needs at connection and invoke time."""

    source: Literal["openapi2", "openapi3"]
    title: str
    base_path: str = "/"
    parameter_sets: list[ParameterSet]
    policies: list[Policy] = []
    operations: list[Operation] = []
    warnings: list[str] = []

    def parameter_set(self, name: str | None) -> ParameterSet | None:
        if name is None:
            return self.parameter_sets[0] if self.parameter_sets else None
        return next((s for s in self.parameter_sets if s.name == name), None)


def load(raw: dict[str, Any] | None) -> ConnectorSettings | None:
    return None if raw is None else ConnectorSettings.model_validate(raw)
