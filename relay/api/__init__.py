"""The relay's HTTP API, one router per resource; ``ROUTERS`` is what the app mounts."""

from __future__ import annotations

from fastapi import APIRouter

from relay.api import connections, connectors, enroll, gateways, health, shares, users

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    users.router,
    gateways.router,
    enroll.router,
    connectors.router,
    connections.router,
    shares.router,
)
