"""ANY /v1/connections/{id}/invoke/{path} (stub; filled in by the tunnel owner)."""

from fastapi import APIRouter

router = APIRouter()
