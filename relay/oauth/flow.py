"""The consent round-trip: authorization code with PKCE (RFC 6749 §4.1, RFC 7636).

1. The connection's owner asks the relay to start (``POST /v1/connections/{id}/oauth/start``).
   The relay makes a random ``state`` and a PKCE verifier, stores the state's hash bound to
   that user and that connection (with the verifier and redirect URI, encrypted), and answers
   the provider's authorization URL with an S256 ``code_challenge``.
2. The owner's browser signs in at the provider, which redirects to ``/v1/oauth/callback``
   with ``code`` and ``state``.
3. The relay looks the state up (unknown, expired or already used: refused), checks the user
   still owns the connection, redeems the code with the verifier and stores the tokens.

A state works once and for ten minutes (``oauth_state_ttl_seconds``). Only its SHA-256 is
stored, so a database reader cannot complete someone's consent.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from relay.config import RelayConfig
from relay.importer.settings import OAuthSettings
from relay.oauth import tokens
from relay.oauth.client import OAuthError, TokenSet, redeem
from relay.secretbox import SecretBox
from relay.store.models import Connection, OAuthState, utcnow

CALLBACK_PATH = "/v1/oauth/callback"
STATE_PURPOSE = "oauth-state"


class ConsentError(OAuthError):
    """The callback cannot complete: bad state, refused consent, failed redemption."""


@dataclass(frozen=True)
class Started:
    authorize_url: str
    expires_at: dt.datetime
    redirect_uri: str


def redirect_uri(config: RelayConfig) -> str:
    return config.oauth_redirect_url or config.base_url + CALLBACK_PATH


def _hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def start(
    session: AsyncSession,
    config: RelayConfig,
    box: SecretBox,
    connection: Connection,
    settings: OAuthSettings,
    user_id: str,
) -> Started:
    state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(48)  # 64 characters, RFC 7636 §4.1
    callback = redirect_uri(config)
    now = utcnow()
    expires = now + dt.timedelta(seconds=config.oauth_state_ttl_seconds)
    await session.execute(delete(OAuthState).where(OAuthState.expires_at < now))
    state_hash = _hash(state)
    session.add(
        OAuthState(
            state_hash=state_hash,
            connection_id=connection.id,
            user_id=user_id,
            sealed=box.seal(
                STATE_PURPOSE,
                state_hash,
                {"verifier": verifier, "redirect_uri": callback, "connection_id": connection.id},
            ),
            created_at=now,
            expires_at=expires,
        )
    )
    await session.flush()
    query = {
        **settings.authorize_params,
        "response_type": "code",
        "client_id": settings.client_id,
        "redirect_uri": callback,
        "state": state,
        "code_challenge": _challenge(verifier),
        "code_challenge_method": "S256",
    }
    if settings.scopes:
        query["scope"] = " ".join(settings.scopes)
    if settings.resource:
        query["resource"] = settings.resource
    separator = "&" if "?" in settings.authorization_url else "?"
    return Started(settings.authorization_url + separator + urlencode(query), expires, callback)


@dataclass(frozen=True)
class PendingConsent:
    connection_id: str
    user_id: str
    verifier: str
    redirect_uri: str


async def claim(session: AsyncSession, box: SecretBox, state: str) -> PendingConsent:
    """Consume a state: it must exist, be unexpired and bound to a connection its user owns."""
    state_hash = _hash(state)
    row = await session.scalar(select(OAuthState).where(OAuthState.state_hash == state_hash))
    if row is None:
        raise ConsentError("unknown or already used state: start the sign-in again")
    result = await session.execute(delete(OAuthState).where(OAuthState.state_hash == state_hash))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise ConsentError("unknown or already used state: start the sign-in again")
    if row.expires_at <= utcnow():
        raise ConsentError("the sign-in took too long (state expired): start it again")
    doc = box.open(STATE_PURPOSE, state_hash, bytes(row.sealed))
    if doc.get("connection_id") != row.connection_id:
        raise ConsentError("state does not match its connection")
    connection = await session.get(Connection, row.connection_id)
    if connection is None or connection.owner_id != row.user_id:
        raise ConsentError("the connection no longer exists or changed owner")
    return PendingConsent(row.connection_id, row.user_id, doc["verifier"], doc["redirect_uri"])


async def finish(
    session: AsyncSession,
    http: httpx.AsyncClient,
    config: RelayConfig,
    box: SecretBox,
    pending: PendingConsent,
    settings: OAuthSettings,
    client_secret: str | None,
    code: str,
) -> TokenSet:
    try:
        got = await redeem(
            http, config, settings, client_secret, code, pending.verifier, pending.redirect_uri
        )
    except OAuthError as exc:
        raise ConsentError(f"the code could not be redeemed: {exc}", exc.error) from None
    await tokens.save(session, box, pending.connection_id, got)
    return got
