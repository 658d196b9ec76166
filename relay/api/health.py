"""Probes and metrics, the only anonymous HTTP endpoints.

``/healthz`` says the process serves requests (liveness: restart me if not); ``/readyz`` says
it can do useful work, i.e. its database answers (readiness: route traffic elsewhere if not).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from backhaul import tallies
from relay.problems import problem
from relay.store.db import sessions

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> dict[str, str] | Response:
    try:
        async with sessions(request)() as session:
            await session.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError, AttributeError):
        return problem(503, "Not Ready", "the database does not answer")
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    tallies.flush()  # what the data path counted on its own (backhaul.tallies)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
