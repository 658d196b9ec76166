"""What one invoke will send: the connection's connector, parameters and policies, applied.

:func:`load` reads, next to :func:`relay.store.queries.invoke_target`, what an imported
connector adds (policies, operations, parameter values, the parameter set's auth scheme,
OAuth settings) and checks that the connection's owner still has access to the connector
(a connector share taken back stops the connections made with it). :meth:`Plan.rewrite` then
applies the policy templates to the caller's request, for the gateway path (before the OPEN
head is built) and the online path alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from relay import policies, sharing
from relay.cache import ReadCache, lookup
from relay.importer import settings as connector_settings
from relay.importer.settings import ConnectorSettings
from relay.oauth.tokens import OAuthTarget
from relay.problems import ProblemError
from relay.request_parts import RequestParts
from relay.store import Forbidden, NotFound
from relay.store.models import Connection, Connector
from relay.store.queries import InvokeTarget


@dataclass(frozen=True)
class Plan:
    connection_id: str
    connector_id: str
    base_url: str
    auth_type: str
    api_key_name: str | None
    api_key_in: str | None
    settings: ConnectorSettings | None
    #: Called by the relay itself (no gateway).
    online: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    oauth: OAuthTarget | None = None
    #: auth_type "windows" (relay.windows): the scheme and the SPN override.
    windows_scheme: str | None = None
    spn: str | None = None

    def auth_spec(self) -> dict[str, Any]:
        """The OPEN head's ``auth`` object (the credentials travel sealed beside it)."""
        spec: dict[str, Any] = {
            "type": self.auth_type,
            "api_key_name": self.api_key_name,
            "api_key_in": self.api_key_in,
        }
        if self.auth_type == "windows":
            # Only for windows, so an agent that predates it never meets unknown keys.
            spec["windows_scheme"] = self.windows_scheme or "negotiate"
            spec["spn"] = self.spn
        return spec

    def rewrite(
        self,
        method: str,
        path: str,
        query: str,
        headers: list[list[str]] | list[tuple[str, str]],
        secrets: dict[str, Any] | None = None,
    ) -> RequestParts:
        """The request after the connector's policies; a refused rewrite is a 502 problem."""
        parts = RequestParts(
            method=method,
            path=path,
            query=query,
            headers=tuple((str(k), str(v)) for k, v in headers),
            base_url=self.base_url,
        )
        if self.settings is None or not self.settings.policies:
            return parts
        values = {**self.parameters, **(secrets or {})}
        try:
            return policies.apply(
                self.settings.policies,
                self.settings.operations,
                parts,
                values,
                self.settings.base_path,
                host_per_request=self.online,
            )
        except policies.PolicyError as exc:
            raise ProblemError(502, "Connector policy refused", str(exc)) from None


_PLANS = ReadCache()


async def for_target(request: Request, target: InvokeTarget) -> Plan:
    """:func:`load`, cached like the invoke target until the store next changes."""
    return await lookup(
        _PLANS,
        target.connection_id,
        lambda session: load(session, target),
        request.scope["app"].state.db,
    )


async def load(session: AsyncSession, target: InvokeTarget) -> Plan:
    connection = await session.get(Connection, target.connection_id)
    connector = await session.get(Connector, target.connector_id)
    if connection is None or connector is None:
        raise NotFound(f"no connection {target.connection_id}")
    if not await sharing.owner_may_use(session, connector, connection.owner_id):
        raise Forbidden(
            f"the owner of {connection.id} no longer has access to connector {connector.id}"
        )
    found = connector_settings.load(connector.settings)
    pset = None if found is None else found.parameter_set(connection.parameter_set)
    auth_type = connection.auth_type or connector.auth_type
    oauth = None
    if auth_type == "oauth2" and pset is not None and pset.oauth is not None:
        oauth = OAuthTarget(connection.id, connector.id, pset.oauth, connector.oauth_client_secret)
    return Plan(
        connection_id=connection.id,
        connector_id=connector.id,
        base_url=connection.base_url or connector.base_url,
        auth_type=auth_type,
        api_key_name=pset.api_key_name if pset is not None else connector.api_key_name,
        api_key_in=pset.api_key_in if pset is not None else connector.api_key_in,
        settings=found,
        parameters=dict(connection.parameter_values or {}),
        oauth=oauth,
        online=connector.gateway_id is None,
        windows_scheme=connector.windows_scheme,
        spn=connector.spn,
    )
