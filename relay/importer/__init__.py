"""Connector import: an OpenAPI 2.0 definition with its ``apiProperties.json``, or OpenAPI 3.

The result is a connector (base URL, auth scheme, gateway or online) plus
:class:`~relay.importer.settings.ConnectorSettings`: the parameter sets a connection chooses
from, the policies the relay applies at invoke time, the operations they refer to, and the
warnings for everything in the files that Backhaul will not run (a ``script.csx``, an unknown
policy template, an extra security scheme). A file that cannot make a usable connector raises
:class:`~relay.importer.errors.DefinitionError` with the field and the reason.

Errors::

    RelayError
    └── DefinitionError     the definition cannot be imported (HTTP 422)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.importer import jsondoc, openapi, properties
from relay.importer.errors import DefinitionError
from relay.importer.settings import ConnectorSettings, ParameterSet

__all__ = ["DefinitionError", "ImportRequest", "Imported", "import_definition"]


@dataclass(frozen=True)
class ImportRequest:
    swagger: Any = None
    api_properties: Any = None
    openapi: Any = None
    #: The text of script.csx, when the connector has custom code.
    script: str | None = None
    gateway: bool = False
    oauth_client_id: str | None = None
    has_client_secret: bool = False


@dataclass(frozen=True)
class Imported:
    base_url: str
    definition: dict[str, Any]
    settings: ConnectorSettings

    @property
    def default_set(self) -> ParameterSet:
        return self.settings.parameter_sets[0]


def _script_warning(script: str | None, props: dict[str, Any], warnings: list[str]) -> None:
    ops = jsondoc.get(props, "scriptOperations")
    names = [str(o) for o in ops] if isinstance(ops, list) else []
    if script is None and not names:
        return
    which = f" (operations: {', '.join(names)})" if names else ""
    warnings.append(
        "script.csx: custom code cannot run in Backhaul; requests are sent to the API "
        f"without it{which}"
    )


def import_definition(request: ImportRequest) -> Imported:
    if (request.swagger is None) == (request.openapi is None):
        raise DefinitionError('give either "swagger" (with "api_properties") or "openapi"')
    if request.swagger is not None:
        doc = jsondoc.parse(request.swagger, "swagger")
        props_doc = (
            None
            if request.api_properties is None
            else jsondoc.parse(request.api_properties, "api_properties")
        )
        api = openapi.read(doc, "openapi2")
    else:
        if request.api_properties is not None:
            raise DefinitionError('"api_properties" goes with "swagger" (OpenAPI 2.0) only')
        doc = jsondoc.parse(request.openapi, "openapi")
        props_doc = None
        api = openapi.read(doc, "openapi3")
    warnings = list(api.warnings)
    props = properties.properties_of(props_doc)
    override = properties.OAuthOverride(request.oauth_client_id, request.has_client_secret)
    sets = properties.parameter_sets(props, api, override, warnings)
    usable = []
    refusals = []
    for pset in sets:
        if pset.auth_type == "oauth2" and request.gateway:
            refusals.append(
                f"parameter set {pset.name!r}: OAuth 2.0 connectors are online connectors, "
                "called by the relay itself; remove gateway_id"
            )
        elif pset.needs_gateway and not request.gateway:
            refusals.append(
                f"parameter set {pset.name!r}: {pset.auth_type} authentication through "
                "gatewaySetting needs an on-premises gateway; pass gateway_id"
            )
        else:
            usable.append(pset)
    if not usable:
        raise DefinitionError(refusals[0])
    warnings += [f"{reason}; the set is not offered" for reason in refusals]
    _script_warning(request.script, props, warnings)
    policies = properties.policies(props, api.operations, usable, request.gateway, warnings)
    settings = ConnectorSettings(
        source=api.source,
        title=api.title,
        base_path=api.base_path,
        parameter_sets=usable,
        policies=policies,
        operations=api.operations,
        warnings=warnings,
    )
    return Imported(base_url=api.base_url, definition=doc, settings=settings)
