"""The relay's HTTP API, one router per resource; ``ROUTERS`` is what the app mounts."""

from __future__ import annotations

from fastapi import APIRouter

from relay.api import (
    audit,
    connection_openapi,
    connections,
    connector_import,
    connector_shares,
    connectors,
    enroll,
    gateway_keys,
    gateways,
    health,
    oauth,
    shares,
    users,
)

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    users.router,
    gateways.router,
    gateway_keys.router,
    enroll.router,
    connectors.router,
    connections.router,
    shares.router,
    connector_import.router,
    connector_shares.router,
    connection_openapi.router,
    oauth.router,
    audit.router,
)
