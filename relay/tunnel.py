"""The /v1/tunnel WebSocket endpoint (stub; filled in by the tunnel owner)."""

from fastapi import APIRouter

router = APIRouter()
