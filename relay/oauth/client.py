"""Talking to a provider's token endpoint (RFC 6749 §4.1.3 and §6, RFC 7636 §4.5).

The client authenticates with ``client_secret_post`` when the connector has a secret, and as
a public client (PKCE only) when it has none. Responses are read as JSON, or as a form when a
provider (GitHub without ``Accept``) answers that way; ``expires_in`` may be a number or a
string (Entra ID v1 sends strings).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx

from relay import RelayError
from relay.config import RelayConfig
from relay.egress import EgressDenied, check
from relay.importer.settings import OAuthSettings

TIMEOUT = httpx.Timeout(15.0)


class OAuthError(RelayError):
    """A token endpoint refused or could not be reached; ``error`` is RFC 6749 §5.2's code."""

    def __init__(self, message: str, error: str | None = None) -> None:
        super().__init__(message)
        self.error = error


class ConsentRequired(OAuthError):
    """The connection has no usable token: its owner must sign in (again)."""


@dataclass(frozen=True)
class TokenSet:
    access_token: str
    token_type: str = "Bearer"  # noqa: S105 - the scheme name
    refresh_token: str | None = None
    #: Seconds since the epoch; None when the provider did not say.
    expires_at: float | None = None
    scope: str | None = None
    #: When the token was obtained, so a short-lived token is not refreshed on every use.
    obtained_at: float | None = None

    def to_doc(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at,
            "scope": self.scope,
            "obtained_at": self.obtained_at,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> TokenSet:
        return cls(
            access_token=str(doc["access_token"]),
            token_type=str(doc.get("token_type") or "Bearer"),
            refresh_token=doc.get("refresh_token"),
            expires_at=doc.get("expires_at"),
            scope=doc.get("scope"),
            obtained_at=doc.get("obtained_at"),
        )

    def expires_within(self, seconds: float) -> bool:
        return self.expires_at is not None and self.expires_at - seconds <= time.time()

    def refresh_due(self, margin: float) -> bool:
        """Within ``margin`` of expiry, or past half its lifetime when that is shorter."""
        if self.expires_at is None:
            return False
        if self.obtained_at is not None:
            margin = min(margin, (self.expires_at - self.obtained_at) / 2)
        return self.expires_within(margin)


def _parse(response: httpx.Response) -> dict[str, Any]:
    kind = response.headers.get("content-type", "")
    try:
        if "json" in kind or response.content.strip().startswith(b"{"):
            body = response.json()
            return body if isinstance(body, dict) else {}
        return dict(parse_qsl(response.text, keep_blank_values=True))
    except ValueError:
        return {}


def _expires_at(body: dict[str, Any]) -> float | None:
    for key in ("expires_in",):
        value = body.get(key)
        if value is not None:
            try:
                return time.time() + float(value)
            except (TypeError, ValueError):
                return None
    value = body.get("expires_on")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


async def _request(
    http: httpx.AsyncClient,
    config: RelayConfig,
    url: str,
    form: dict[str, str],
    settings: OAuthSettings,
    client_secret: str | None,
) -> TokenSet:
    form["client_id"] = settings.client_id
    if client_secret:
        form["client_secret"] = client_secret
    if settings.resource:
        form["resource"] = settings.resource
    try:
        await check(url, config)
        response = await http.post(
            url, data=form, headers={"Accept": "application/json"}, timeout=TIMEOUT
        )
    except EgressDenied as exc:
        raise OAuthError(f"token endpoint refused: {exc}") from None
    except httpx.HTTPError as exc:
        raise OAuthError(f"token endpoint unreachable: {type(exc).__name__}") from None
    body = _parse(response)
    if response.status_code >= 400 or "error" in body or not body.get("access_token"):
        error = str(body.get("error") or f"http_{response.status_code}")
        description = str(body.get("error_description") or "")[:200]
        raise OAuthError(
            f"token endpoint answered {response.status_code} {error}"
            + (f": {description}" if description else ""),
            error,
        )
    return TokenSet(
        access_token=str(body["access_token"]),
        token_type=str(body.get("token_type") or "Bearer"),
        refresh_token=str(body["refresh_token"]) if body.get("refresh_token") else None,
        expires_at=_expires_at(body),
        scope=str(body["scope"]) if body.get("scope") else None,
        obtained_at=time.time(),
    )


async def redeem(
    http: httpx.AsyncClient,
    config: RelayConfig,
    settings: OAuthSettings,
    client_secret: str | None,
    code: str,
    verifier: str,
    redirect_uri: str,
) -> TokenSet:
    """Exchange an authorization code (with its PKCE verifier) for tokens."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    return await _request(http, config, settings.token_url, form, settings, client_secret)


async def refresh(
    http: httpx.AsyncClient,
    config: RelayConfig,
    settings: OAuthSettings,
    client_secret: str | None,
    refresh_token: str,
) -> TokenSet:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if settings.scopes and settings.identity_provider == "aad":
        form["scope"] = " ".join(settings.scopes)
    url = settings.refresh_url or settings.token_url
    fresh = await _request(http, config, url, form, settings, client_secret)
    if fresh.refresh_token is None:
        # RFC 6749 §6: the server MAY issue a new refresh token; keep the old one otherwise.
        fresh = dataclasses.replace(fresh, refresh_token=refresh_token)
    return fresh
