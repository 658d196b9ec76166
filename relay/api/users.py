"""Users and their API tokens. Only admins create or delete users; anyone mints own tokens."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from relay.identity import AdminUser, CurrentUser, hash_token, new_api_token
from relay.problems import ProblemError
from relay.store import queries
from relay.store.db import SessionDep

router = APIRouter(prefix="/v1", tags=["users"])

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"


class UserCreate(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    role: Literal["admin", "user"] = "user"


class UserCreated(BaseModel):
    id: str
    name: str
    role: str
    token: str


class UserView(BaseModel):
    id: str
    name: str
    role: str
    created_at: dt.datetime


class TokenCreated(BaseModel):
    id: str
    token: str


@router.post("/users", status_code=201)
async def create_user(body: UserCreate, _: AdminUser, session: SessionDep) -> UserCreated:
    user = await queries.create_user(session, body.name, body.role)
    token = new_api_token()
    await queries.add_api_token(session, user.id, hash_token(token))
    await session.commit()
    return UserCreated(id=user.id, name=user.name, role=user.role, token=token)


@router.get("/users/me")
async def me(caller: CurrentUser, session: SessionDep) -> UserView:
    user = await queries.active_user(session, caller.id)
    if user is None:
        raise ProblemError(404, "Not Found", "your user no longer exists")
    return UserView(id=user.id, name=user.name, role=user.role, created_at=user.created_at)


@router.delete("/users/{user_id}", status_code=204)
async def delete_user(user_id: str, caller: AdminUser, session: SessionDep) -> Response:
    if user_id == caller.id:
        raise ProblemError(409, "Conflict", "an admin cannot delete their own user")
    await queries.delete_user(session, user_id)
    await session.commit()
    return Response(status_code=204)


@router.post("/tokens", status_code=201)
async def create_token(caller: CurrentUser, session: SessionDep) -> TokenCreated:
    token = new_api_token()
    row = await queries.add_api_token(session, caller.id, hash_token(token))
    await session.commit()
    return TokenCreated(id=row.id, token=token)
