"""The relay's ASGI application: routers, error handlers, lifespan, request log.

Uvicorn's access log is off because it prints query strings, and an API key sent in a query
parameter would land in the log. ``AccessLog`` logs method, path, status and duration only.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backhaul import gc_tuning, malloc_tuning
from backhaul.version import __version__
from relay import (
    admin,
    allocator,
    audit,
    audit_retention,
    cache,
    egress,
    identity,
    limits,
    problems,
    rotation,
    tunnel,
)
from relay.api import ROUTERS
from relay.api import invoke as invoke_routes
from relay.config import RelayConfig, ensure_data_dir
from relay.fastpath import RelayApp
from relay.forward import peer_client
from relay.hub import Hub
from relay.registry import Registry
from relay.store import migrate
from relay.store.db import make_engine, make_session_factory

log = structlog.get_logger()


class AccessLog:
    """Pure ASGI middleware (no BaseHTTPMiddleware), so streamed bodies are not buffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            log.info(
                "http request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - start) * 1000, 1),
            )


class AppState(State):
    """Starlette's ``app.state``, with each value also kept as a plain attribute.

    Starlette keeps the values in a dict behind ``__getattr__``, an interpreted call for
    every read; the invoke path reads half a dozen of them per request. Here a read finds the
    attribute directly and ``__getattr__`` is reached only for a name never set. Writes and
    deletes go to both, through any of State's ways in.
    """

    def __setattr__(self, key: Any, value: Any) -> None:
        super().__setattr__(key, value)
        object.__setattr__(self, key, value)

    def __delattr__(self, key: Any) -> None:
        super().__delattr__(key)
        object.__delattr__(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __delitem__(self, key: str) -> None:
        self.__delattr__(key)


def _peer_ca(config: RelayConfig) -> str | None:
    """CA file for calls between relay instances: configured, else a dev relay's own cert."""
    if config.peer_ca_file is not None:
        return str(config.peer_ca_file)
    dev_cert = config.data_dir / "tls" / "relay.crt"
    if config.dev and dev_cert.exists():
        return str(dev_cert)
    return None


def create_app(config: RelayConfig) -> FastAPI:
    cache.install()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if config.database_url.startswith("sqlite"):
            ensure_data_dir(config.data_dir)
        engine = make_engine(config.database_url)
        trimmer = allocator.Trimmer(float(config.memory_trim_seconds))
        pruner = audit_retention.Pruner(engine, float(config.audit_retention_days))
        try:
            await migrate.prepare(engine)
            app.state.engine = engine
            app.state.db = make_session_factory(engine)
            trimmer.start()
            pruner.start()
            app.state.hub = Hub(config.instance_id, on_change=trimmer.poke)
            app.state.registry = Registry(
                app.state.hub,
                config.instance_id,
                config.peer_url,
                config.redis_url,
                ttl=config.registry_ttl_seconds,
            )
            app.state.peers = peer_client(_peer_ca(config), config.invoke_timeout_max_seconds)
            await app.state.registry.start()
            gc_tuning.settle()
            malloc_tuning.tune()
            yield {}
            await rotation.shutdown(app.state)
            await app.state.registry.stop()
            await app.state.hub.close()
            await tunnel.retiring.cancel()
            await app.state.peers.aclose()
            await egress.close(app.state)
            await audit.drain()
            await identity.drain()
        finally:
            await pruner.stop()
            await trimmer.stop()
            await engine.dispose()

    app = RelayApp(
        title="Backhaul relay",
        version=__version__,
        description="Invoke on-premises APIs through an outbound-only gateway tunnel.",
        lifespan=lifespan,
    )
    app.state = AppState()
    app.state.config = config
    #: Worker processes serving this address (relay.workers sets it in each of them).
    app.state.workers = 1
    problems.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(tunnel.router)
    app.include_router(invoke_routes.router)
    admin.install(app)  # the status page, and the invoke activity it shows (outside the fast path)
    limits.install(app)  # outside the fast path, inside the access log
    app.add_middleware(AccessLog)
    return app
