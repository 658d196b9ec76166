"""Each online connection's OAuth tokens: encrypted at rest, refreshed before they expire.

Tokens are stored encrypted with the relay's key (:mod:`relay.secretbox`), bound to the
connection id; only their expiry and scope are in clear, for status and refresh decisions.

An invoke asks for an access token once, before it sends the request: when the token expires
within ``oauth_refresh_margin_seconds`` it is refreshed first (RFC 6749 §6). A response that
is already streaming never needs the token again, so a long download is not cut when the
token expires half-way. When the API answers 401 anyway (a token revoked early, a clock
skew), :meth:`Tokens.after_unauthorized` refreshes once and the invoke is retried once.

Refreshes of one connection are serialized in this process, and a waiter re-reads the row
first, so a burst of requests on an expiring token costs one refresh, not one each. A refresh
token the provider refuses (``invalid_grant``: revoked, expired) removes the tokens: the
connection then answers "consent required" until its owner signs in again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import weakref
from dataclasses import dataclass

import httpx
import structlog
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from relay.config import RelayConfig
from relay.importer.settings import OAuthSettings
from relay.oauth.client import ConsentRequired, OAuthError, TokenSet, refresh
from relay.secretbox import SecretBox, SecretBoxError, box_for
from relay.store.db import SessionFactory
from relay.store.models import OAuthState, OAuthToken, utcnow

log = structlog.get_logger("backhaul.relay.oauth")

PURPOSE = "oauth-token"
SECRET_PURPOSE = "oauth-client-secret"  # noqa: S105 - a label
_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def _lock(connection_id: str) -> asyncio.Lock:
    lock = _locks.get(connection_id)
    if lock is None:
        lock = asyncio.Lock()
        _locks[connection_id] = lock
    return lock


@dataclass(frozen=True)
class OAuthTarget:
    """What a refresh needs, read with the connection so no ORM object is kept."""

    connection_id: str
    connector_id: str
    settings: OAuthSettings
    client_secret_blob: bytes | None


def client_secret(box: SecretBox, connector_id: str, blob: bytes | None) -> str | None:
    if not blob:
        return None
    value = box.open(SECRET_PURPOSE, connector_id, blob)
    return str(value) if value else None


async def save(session: AsyncSession, box: SecretBox, connection_id: str, tokens: TokenSet) -> None:
    row = await session.get(OAuthToken, connection_id)
    sealed = box.seal(PURPOSE, connection_id, tokens.to_doc())
    expires = (
        None if tokens.expires_at is None else dt.datetime.fromtimestamp(tokens.expires_at, dt.UTC)
    )
    if row is None:
        row = OAuthToken(connection_id=connection_id)
        session.add(row)
    row.sealed = sealed
    row.expires_at = expires
    row.has_refresh_token = tokens.refresh_token is not None
    row.scope = tokens.scope
    row.updated_at = utcnow()
    await session.flush()


async def load(session: AsyncSession, box: SecretBox, connection_id: str) -> TokenSet | None:
    row = await session.get(OAuthToken, connection_id, populate_existing=True)
    if row is None:
        return None
    return TokenSet.from_doc(box.open(PURPOSE, connection_id, bytes(row.sealed)))


async def forget(session: AsyncSession, connection_id: str) -> None:
    """Remove a connection's tokens and pending consents (deletion, sign-out)."""
    await session.execute(delete(OAuthToken).where(OAuthToken.connection_id == connection_id))
    await session.execute(delete(OAuthState).where(OAuthState.connection_id == connection_id))


class Tokens:
    """Hands out valid access tokens for invokes; one per app."""

    def __init__(self, config: RelayConfig, sessions: SessionFactory, http: httpx.AsyncClient):
        self.config = config
        self.sessions = sessions
        self.http = http

    def _box(self) -> SecretBox:
        try:
            return box_for(self.config)
        except SecretBoxError as exc:
            raise OAuthError(str(exc)) from None

    async def _current(self, box: SecretBox, connection_id: str) -> TokenSet:
        async with self.sessions() as session:
            try:
                tokens = await load(session, box, connection_id)
            except SecretBoxError as exc:
                raise ConsentRequired(f"stored tokens unusable: {exc}") from None
        if tokens is None:
            raise ConsentRequired(
                f"connection {connection_id} is not signed in; its owner must give consent "
                f"(POST /v1/connections/{connection_id}/oauth/start)"
            )
        return tokens

    async def access_token(self, target: OAuthTarget) -> str:
        box = self._box()
        margin = float(self.config.oauth_refresh_margin_seconds)
        tokens = await self._current(box, target.connection_id)
        if not tokens.refresh_due(margin):
            return tokens.access_token
        async with _lock(target.connection_id):
            tokens = await self._current(box, target.connection_id)
            if not tokens.refresh_due(margin):
                return tokens.access_token  # refreshed by the request we waited for
            if tokens.refresh_token is None:
                if tokens.expires_within(0):
                    await self._drop(target.connection_id)
                    raise ConsentRequired(
                        f"the access token of {target.connection_id} expired and the provider "
                        "gave no refresh token; its owner must sign in again"
                    )
                return tokens.access_token
            try:
                return (await self._refresh(box, target, tokens)).access_token
            except ConsentRequired:
                raise
            except OAuthError as exc:
                if not tokens.expires_within(0):
                    log.warning(
                        "oauth.refresh_failed", connection_id=target.connection_id, error=str(exc)
                    )
                    return tokens.access_token
                raise

    async def after_unauthorized(self, target: OAuthTarget, stale: str) -> str | None:
        """A new access token after the API refused ``stale``; None when none can be had."""
        box = self._box()
        async with _lock(target.connection_id):
            try:
                tokens = await self._current(box, target.connection_id)
            except ConsentRequired:
                return None
            if tokens.access_token != stale:
                return tokens.access_token
            if tokens.refresh_token is None:
                return None
            try:
                return (await self._refresh(box, target, tokens)).access_token
            except OAuthError as exc:
                log.info(
                    "oauth.refresh_after_401_failed",
                    connection_id=target.connection_id,
                    error=str(exc),
                )
                return None

    async def _refresh(self, box: SecretBox, target: OAuthTarget, tokens: TokenSet) -> TokenSet:
        assert tokens.refresh_token is not None
        secret = client_secret(box, target.connector_id, target.client_secret_blob)
        try:
            fresh = await refresh(
                self.http, self.config, target.settings, secret, tokens.refresh_token
            )
        except OAuthError as exc:
            if exc.error == "invalid_grant":
                await self._drop(target.connection_id)
                raise ConsentRequired(
                    f"the provider refused the refresh token of {target.connection_id} "
                    "(invalid_grant: revoked or expired); its owner must sign in again",
                    exc.error,
                ) from None
            raise
        async with self.sessions() as session:
            await save(session, box, target.connection_id, fresh)
            await session.commit()
        log.info("oauth.refreshed", connection_id=target.connection_id)
        return fresh

    async def _drop(self, connection_id: str) -> None:
        async with self.sessions() as session:
            await session.execute(
                delete(OAuthToken).where(OAuthToken.connection_id == connection_id)
            )
            await session.commit()
