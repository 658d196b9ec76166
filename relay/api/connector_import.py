"""Importing connectors from their definitions (``POST /v1/connectors/import``).

The body carries the files as they are: ``{"swagger": {...}, "api_properties": {...}}`` for
an OpenAPI 2.0 custom connector, or ``{"openapi": {...}}``; each may also be the file's text
(a byte-order mark is fine). ``script`` is the text of a ``script.csx``, reported as a warning.
``oauth.client_id`` / ``oauth.client_secret`` register the relay's OAuth client when the
files do not (the secret is never in the files, and is stored encrypted).

The answer says what a connection will ask for: the auth scheme, the identity provider for
OAuth, the parameters (with what each is used for), every parameter set, and the warnings.
``PUT /v1/connectors/{id}/import`` replaces the definition of a connector the caller may edit.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, SecretStr, StringConstraints

from relay import sharing
from relay.identity import CurrentUser
from relay.importer import DefinitionError, Imported, ImportRequest, import_definition
from relay.importer.settings import ParameterSet
from relay.oauth.flow import redirect_uri
from relay.oauth.tokens import SECRET_PURPOSE
from relay.problems import ProblemError
from relay.secretbox import SecretBoxError, box_for
from relay.store import Conflict, queries
from relay.store.db import SessionDep
from relay.store.models import Connector, utcnow

router = APIRouter(prefix="/v1/connectors", tags=["connectors"])

Document = dict[str, Any] | str


class OAuthClient(BaseModel):
    client_id: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None
    client_secret: SecretStr | None = None


class ConnectorImport(BaseModel):
    swagger: Document | None = None
    api_properties: Document | None = None
    openapi: Document | None = None
    script: str | None = None
    gateway_id: str | None = None
    name: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
        | None
    ) = None
    oauth: OAuthClient | None = None


def _set_view(pset: ParameterSet) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": pset.name,
        "auth_type": pset.auth_type,
        "allow_sharing": pset.allow_sharing,
        "parameters": [p.public() for p in pset.parameters],
    }
    if pset.display_name:
        doc["display_name"] = pset.display_name
    if pset.oauth is not None:
        doc["identity_provider"] = pset.oauth.identity_provider
    return doc


def result(connector: Connector, imported: Imported, callback: str) -> dict[str, Any]:
    first = imported.default_set
    doc: dict[str, Any] = {
        "id": connector.id,
        "name": connector.name,
        "base_url": connector.base_url,
        "gateway_id": connector.gateway_id,
        "source": imported.settings.source,
        "auth_type": first.auth_type,
        "parameters": [p.public() for p in first.parameters],
        "parameter_sets": [_set_view(s) for s in imported.settings.parameter_sets],
        "operations": len(imported.settings.operations),
        "policies": [p.template for p in imported.settings.policies],
        "warnings": list(imported.settings.warnings),
    }
    if first.oauth is not None:
        doc["identity_provider"] = first.oauth.identity_provider
    if any(s.oauth is not None for s in imported.settings.parameter_sets):
        doc["redirect_url"] = callback
    return doc


def _import(body: ConnectorImport) -> Imported:
    client = body.oauth or OAuthClient()
    try:
        return import_definition(
            ImportRequest(
                swagger=body.swagger,
                api_properties=body.api_properties,
                openapi=body.openapi,
                script=body.script,
                gateway=body.gateway_id is not None,
                oauth_client_id=client.client_id,
                has_client_secret=client.client_secret is not None,
            )
        )
    except DefinitionError as exc:
        raise ProblemError(422, "Definition not importable", str(exc)) from None


def _apply(connector: Connector, imported: Imported, body: ConnectorImport) -> None:
    first = imported.default_set
    connector.base_url = imported.base_url
    connector.auth_type = first.auth_type
    connector.api_key_name = first.api_key_name
    connector.api_key_in = first.api_key_in
    if first.auth_type == "windows":
        connector.windows_scheme = connector.windows_scheme or "negotiate"
    else:
        connector.windows_scheme = connector.spn = None
    connector.definition = imported.definition
    connector.settings = imported.settings.model_dump(mode="json")
    if body.name or not connector.name:
        connector.name = body.name or imported.settings.title


def _store_secret(request: Request, connector: Connector, body: ConnectorImport) -> None:
    if body.oauth is None or body.oauth.client_secret is None:
        return
    try:
        box = box_for(request.app.state.config)
    except SecretBoxError as exc:
        raise ProblemError(503, "Relay secret key missing", str(exc)) from None
    connector.oauth_client_secret = box.seal(
        SECRET_PURPOSE, connector.id, body.oauth.client_secret.get_secret_value()
    )


@router.post("/import", status_code=201)
async def import_connector(
    body: ConnectorImport, caller: CurrentUser, session: SessionDep, request: Request
) -> JSONResponse:
    """Create a connector from an OpenAPI 2.0 + apiProperties.json, or an OpenAPI 3 document."""
    imported = _import(body)
    if body.gateway_id is not None:
        await queries.visible_gateway(session, body.gateway_id, caller.id, caller.is_admin)
    connector = Connector(name="", owner_id=caller.id, gateway_id=body.gateway_id)
    _apply(connector, imported, body)
    connector = await queries.create_connector(session, connector)
    _store_secret(request, connector, body)
    await session.commit()
    callback = redirect_uri(request.app.state.config)
    return JSONResponse(result(connector, imported, callback), status_code=201)


@router.put("/{connector_id}/import")
async def reimport_connector(
    connector_id: str,
    body: ConnectorImport,
    caller: CurrentUser,
    session: SessionDep,
    request: Request,
) -> JSONResponse:
    """Replace the definition of a connector the caller may edit (owner, can_edit, admin).

    The gateway cannot change here: connections are sealed to it.
    """
    found = await sharing.access(session, connector_id, caller)
    if not found.can_edit:
        raise ProblemError(
            403, "Forbidden", f"your access to {connector_id} ({found.role}) does not allow editing"
        )
    connector = found.connector
    if body.gateway_id is not None and body.gateway_id != connector.gateway_id:
        raise Conflict("the gateway of a connector cannot change; import a new connector")
    body = body.model_copy(update={"gateway_id": connector.gateway_id})
    imported = _import(body)
    old_base = connector.base_url
    _apply(connector, imported, body)
    _store_secret(request, connector, body)
    connector.updated_at = utcnow()
    await session.commit()
    doc = result(connector, imported, redirect_uri(request.app.state.config))
    if old_base != connector.base_url and connector.gateway_id is not None:
        doc["warnings"].append(
            f"the base URL changed from {old_base}: gateway connections are sealed to the old "
            "one and need their credentials again (PUT /v1/connections/{id}/credentials)"
        )
    return JSONResponse(doc)
