"""Identity providers of ``oauthSetting``: where to send the user, where to redeem the code.

=================  ==========================================================================
identityProvider   endpoints
=================  ==========================================================================
``oauth2``         generic: ``authorizationUrl``, ``tokenUrl`` and ``refreshUrl`` from
                   ``customParameters`` (or the document's oauth2 security scheme)
``aad``            Microsoft Entra ID: ``{loginUri}/{tenantId}/oauth2/v2.0/authorize`` with
                   scopes, or the v1 endpoints with ``resource`` when ``resourceUri`` is set
``github``         ``https://github.com/login/oauth/authorize`` and ``…/access_token``
``microsoftaccount`` ``https://login.live.com/oauth20_authorize.srf`` and ``…_token.srf``
=================  ==========================================================================

Any provider's endpoints can be replaced with ``authorizationUrl`` / ``tokenUrl`` /
``refreshUrl`` custom parameters (a sovereign cloud, GitHub Enterprise, a test server). Custom
parameters Backhaul does not know are passed to the authorization request as query
parameters, the way the Power Platform passes them (``prompt``, ``domain_hint`` …).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from relay.importer import jsondoc
from relay.importer.errors import DefinitionError
from relay.importer.settings import OAuthSettings

GENERIC = "oauth2"
ENTRA = "aad"
GITHUB = "github"
MICROSOFT_ACCOUNT = "microsoftaccount"
PROVIDERS = (GENERIC, ENTRA, GITHUB, MICROSOFT_ACCOUNT)

ENTRA_LOGIN = "https://login.microsoftonline.com"
GITHUB_AUTHORIZE = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN = "https://github.com/login/oauth/access_token"  # noqa: S105 - a URL
MSA_AUTHORIZE = "https://login.live.com/oauth20_authorize.srf"
MSA_TOKEN = "https://login.live.com/oauth20_token.srf"  # noqa: S105 - a URL

#: customParameters that configure the provider rather than travel to it.
_CONSUMED = frozenset(
    {"authorizationurl", "tokenurl", "refreshurl", "loginuri", "tenantid", "resourceuri"}
)
_ALIASES = {
    "aad": ENTRA,
    "azureactivedirectory": ENTRA,
    "entra": ENTRA,
    "entraid": ENTRA,
    "oauth2": GENERIC,
    "oauth2generic": GENERIC,
    "generic": GENERIC,
    "github": GITHUB,
    "microsoftaccount": MICROSOFT_ACCOUNT,
    "msa": MICROSOFT_ACCOUNT,
}


def _custom(raw: Mapping[str, Any]) -> dict[str, str]:
    """customParameters as {lower-case name: value}; entries are {"value": ...} or plain."""
    out: dict[str, str] = {}
    for name, entry in jsondoc.obj(raw, "customParameters").items():
        value = jsondoc.get(entry, "value") if isinstance(entry, dict) else entry
        if isinstance(value, str | int | float | bool) and str(value).strip():
            out[str(name)] = str(value).strip()
    return out


def _https(url: str | None, where: str) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise DefinitionError(f"{where}: {url!r} is not an absolute http(s) URL")
    return url


def _is_placeholder(value: str | None) -> bool:
    return value is None or "<<" in value or value.lower() in {"clientid", "your client id"}


def resolve(
    raw: Mapping[str, Any],
    where: str,
    *,
    document_urls: tuple[str | None, str | None, str | None] = (None, None, None),
    document_scopes: list[str] | None = None,
    client_id: str | None = None,
    has_client_secret: bool = False,
    warnings: list[str],
) -> OAuthSettings:
    """OAuthSettings from an ``oAuthSettings`` object (or {} for a bare oauth2 scheme)."""
    named = str(jsondoc.get(raw, "identityProvider", GENERIC)).strip()
    provider = _ALIASES.get(named.lower().replace("-", "").replace("_", ""))
    custom = _custom(raw)
    lower = {k.lower(): v for k, v in custom.items()}
    if provider is None:
        if "authorizationurl" in lower and "tokenurl" in lower:
            warnings.append(
                f"{where}.identityProvider: {named!r} is not known; it is used as a generic "
                "OAuth 2.0 provider with the authorizationUrl and tokenUrl given"
            )
            provider = GENERIC
        else:
            raise DefinitionError(
                f"{where}.identityProvider: {named!r} is not supported "
                f"(supported: {', '.join(PROVIDERS)})"
            )
    file_client = jsondoc.text(jsondoc.get(raw, "clientId"))
    chosen_client = client_id or (None if _is_placeholder(file_client) else file_client)
    if chosen_client is None:
        raise DefinitionError(
            f"{where}.clientId: missing; register an app with the provider and pass "
            "oauth.client_id in the import request"
        )
    scopes_raw = jsondoc.get(raw, "scopes")
    scopes = [str(s) for s in scopes_raw] if isinstance(scopes_raw, list) else []
    if not scopes and document_scopes:
        scopes = list(document_scopes)
    doc_auth, doc_token, doc_refresh = document_urls
    resource: str | None = None
    if provider == ENTRA:
        login = (lower.get("loginuri") or ENTRA_LOGIN).rstrip("/")
        tenant = lower.get("tenantid") or "common"
        resource = lower.get("resourceuri")
        if resource and not scopes:
            authorize = f"{login}/{tenant}/oauth2/authorize"
            token = f"{login}/{tenant}/oauth2/token"
        else:
            if resource:
                warnings.append(
                    f"{where}: both scopes and resourceUri are set; the v2.0 endpoint with "
                    "scopes is used and resourceUri is ignored"
                )
                resource = None
            authorize = f"{login}/{tenant}/oauth2/v2.0/authorize"
            token = f"{login}/{tenant}/oauth2/v2.0/token"
            if "offline_access" not in scopes:
                scopes.append("offline_access")
    elif provider == GITHUB:
        authorize, token = GITHUB_AUTHORIZE, GITHUB_TOKEN
    elif provider == MICROSOFT_ACCOUNT:
        authorize, token = MSA_AUTHORIZE, MSA_TOKEN
    else:
        authorize = lower.get("authorizationurl") or doc_auth or ""
        token = lower.get("tokenurl") or doc_token or ""
        if not authorize or not token:
            raise DefinitionError(
                f"{where}: a generic OAuth 2.0 provider needs authorizationUrl and tokenUrl "
                "(customParameters or the document's oauth2 security scheme)"
            )
    authorize = lower.get("authorizationurl", authorize)
    token = lower.get("tokenurl", token)
    refresh = lower.get("refreshurl") or (doc_refresh if provider == GENERIC else None)
    params = {k: v for k, v in custom.items() if k.lower() not in _CONSUMED}
    return OAuthSettings(
        identity_provider=provider,
        client_id=chosen_client,
        scopes=scopes,
        authorization_url=_https(authorize, f"{where}.authorizationUrl") or "",
        token_url=_https(token, f"{where}.tokenUrl") or "",
        refresh_url=_https(refresh, f"{where}.refreshUrl"),
        resource=resource,
        authorize_params=params,
        has_client_secret=has_client_secret,
    )
