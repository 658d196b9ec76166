"""A real OAuth 2.0 authorization server and resource server for the tests.

Built on authlib's server side (``authlib.oauth2.AuthorizationServer`` with the authorization
code grant, PKCE (RFC 7636) and the refresh token grant), adapted to Starlette and served by
uvicorn on a loopback port in a thread. It is a provider like any other to the relay: the
relay reaches it over HTTP, redirects a "browser" to it and redeems codes at its token
endpoint.

Endpoints::

    GET  /authorize      consent; ``?deny=1`` refuses, otherwise user ``ALICE`` agrees
    POST /token          authorization_code (PKCE required) and refresh_token grants
    GET  /api/me         resource: 200 with the caller's user and token, 401 without a
                         valid bearer token (unknown, expired or revoked)
    GET  /api/download   resource: checks the token once, then streams ``size`` bytes over
                         ``seconds`` seconds (the token may expire meanwhile)
    POST /api/echo       resource: returns the body it received

The test controls it through :class:`AuthServer`: token lifetime, revoking access or refresh
tokens, and the record of every request the relay made.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from authlib.oauth2 import AuthorizationServer, OAuth2Error
from authlib.oauth2.rfc6749 import (
    AuthorizationCodeMixin,
    ClientMixin,
    OAuth2Payload,
    OAuth2Request,
    TokenMixin,
    grants,
)
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7636 import CodeChallenge
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ALICE = "alice@provider.test"


@dataclass
class User:
    id: str

    def get_user_id(self) -> str:
        return self.id


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str | None
    redirect_uris: list[str]
    scope: str = "read write offline_access"

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return ""
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return self.client_secret is not None and secrets.compare_digest(
            client_secret, self.client_secret
        )

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.client_secret is None:
            return method == "none"
        return method in ("client_secret_post", "client_secret_basic")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


@dataclass
class Code(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: User
    code_challenge: str | None
    code_challenge_method: str | None

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class Token(TokenMixin):
    access_token: str
    refresh_token: str | None
    client_id: str
    scope: str
    user: User
    expires_in: int
    issued_at: float = field(default_factory=time.time)
    revoked: bool = False
    refresh_revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> User:
        return self.user

    def get_client(self) -> Any:
        return None


class _Payload(OAuth2Payload):
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._datalist: dict[str, list[str]] = defaultdict(list)
        for key, value in pairs:
            self._datalist[key].append(value)
        self._data = {k: v[0] for k, v in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> Any:
        return self._datalist


class _Request(OAuth2Request):
    """authlib's request object over an already-read Starlette request."""

    def __init__(self, request: Request, form: list[tuple[str, str]]) -> None:
        super().__init__(request.method, str(request.url), headers=request.headers)
        query = list(request.query_params.multi_items())
        self.payload = _Payload(query + form)
        self._args = dict(query)
        self._form = dict(form)

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


@dataclass
class State:
    clients: dict[str, Client] = field(default_factory=dict)
    codes: dict[str, Code] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    by_refresh: dict[str, Token] = field(default_factory=dict)
    expires_in: int = 3600
    #: Every request the relay made: (path, grant_type or "", form/query as a dict).
    log: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)


class _CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        state: State = self.server.state
        data = request.payload.data
        state.codes[code] = Code(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=request.scope or "",
            user=request.user,
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
        )

    def query_authorization_code(self, code: str, client: Client) -> Code | None:
        found = self.server.state.codes.get(code)
        return found if found is not None and found.client_id == client.client_id else None

    def delete_authorization_code(self, authorization_code: Code) -> None:
        self.server.state.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: Code) -> User:
        return authorization_code.user


class _RefreshGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotation: each refresh token works once

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        token = self.server.state.by_refresh.get(refresh_token)
        return token if token is not None and not token.refresh_revoked else None

    def authenticate_user(self, refresh_token: Token) -> User:
        return refresh_token.user

    def revoke_old_credential(self, refresh_token: Token) -> None:
        refresh_token.refresh_revoked = True


class _Server(AuthorizationServer):
    def __init__(self, state: State) -> None:
        super().__init__()
        self.state = state
        self.register_token_generator(
            "default",
            BearerTokenGenerator(
                lambda **_: "at-" + secrets.token_urlsafe(24),
                lambda **_: "rt-" + secrets.token_urlsafe(24),
                lambda client, grant_type: state.expires_in,
            ),
        )
        self.register_grant(_CodeGrant, [CodeChallenge(required=True)])
        self.register_grant(_RefreshGrant)

    def query_client(self, client_id: str) -> Client | None:
        return self.state.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        row = Token(
            access_token=token["access_token"],
            refresh_token=token.get("refresh_token"),
            client_id=request.client.client_id,
            scope=token.get("scope", ""),
            user=request.user,
            expires_in=int(token["expires_in"]),
        )
        self.state.tokens[row.access_token] = row
        if row.refresh_token:
            self.state.by_refresh[row.refresh_token] = row

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        assert isinstance(request, OAuth2Request)
        return request

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError

    def handle_response(self, status: int, body: Any, headers: Any) -> Response:
        if isinstance(body, dict):
            return JSONResponse(body, status_code=status, headers=dict(headers))
        return Response(body or b"", status_code=status, headers=dict(headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        return None


def _bearer(server: _Server, request: Request) -> Token | None:
    value = request.headers.get("authorization", "")
    if not value.lower().startswith("bearer "):
        return None
    token = server.state.tokens.get(value[7:].strip())
    if token is None or token.is_revoked() or token.is_expired():
        return None
    return token


def _unauthorized() -> Response:
    return JSONResponse(
        {"error": "invalid_token"},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def make_app(server: _Server) -> Starlette:
    state = server.state

    async def authorize(request: Request) -> Response:
        state.authorize_requests.append(dict(request.query_params))
        oauth_request = _Request(request, [])
        try:
            grant = server.get_consent_grant(oauth_request, end_user=User(ALICE))
        except OAuth2Error as error:
            return JSONResponse(dict(error.get_body()), status_code=400)
        user = None if request.query_params.get("deny") else User(ALICE)
        return server.create_authorization_response(oauth_request, grant_user=user, grant=grant)

    async def token(request: Request) -> Response:
        form = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        state.log.append(("/token", dict(form).get("grant_type", ""), dict(form)))
        return server.create_token_response(_Request(request, form))

    async def me(request: Request) -> Response:
        state.log.append(("/api/me", "", {}))
        found = _bearer(server, request)
        if found is None:
            return _unauthorized()
        return JSONResponse({"user": found.user.id, "token": found.access_token})

    async def download(request: Request) -> Response:
        found = _bearer(server, request)  # checked once, at the start, like real APIs
        if found is None:
            return _unauthorized()
        size = int(request.query_params.get("size", "1048576"))
        seconds = float(request.query_params.get("seconds", "0"))
        chunks = 20

        async def body() -> AsyncIterator[bytes]:
            for i in range(chunks):
                piece = size // chunks + (size % chunks if i == chunks - 1 else 0)
                yield b"x" * piece
                await asyncio.sleep(seconds / chunks)

        return StreamingResponse(
            body(),
            media_type="application/octet-stream",
            headers={"X-Token-Expired-At-Start": str(found.is_expired()).lower()},
        )

    async def echo(request: Request) -> Response:
        if _bearer(server, request) is None:
            return _unauthorized()
        data = await request.body()
        return Response(data, media_type=request.headers.get("content-type", "text/plain"))

    return Starlette(
        routes=[
            Route("/authorize", authorize),
            Route("/token", token, methods=["POST"]),
            Route("/api/me", me),
            Route("/api/download", download),
            Route("/api/echo", echo, methods=["POST"]),
        ]
    )


def connector_definition(
    server: AuthServer,
    client_id: str,
    provider: str = "oauth2",
    scopes: list[str] | None = None,
    custom: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An import body for an online connector whose API and provider are ``server``."""
    swagger = {
        "swagger": "2.0",
        "info": {"title": f"{provider} test API", "version": "1"},
        "host": f"127.0.0.1:{server.port}",
        "basePath": "/api",
        "schemes": ["http"],
        "paths": {
            "/me": {"get": {"operationId": "Me"}},
            "/download": {"get": {"operationId": "Download"}},
            "/echo": {"post": {"operationId": "Echo"}},
        },
    }
    params = {
        "authorizationUrl": f"{server.url}/authorize",
        "tokenUrl": f"{server.url}/token",
        **(custom or {}),
    }
    props = {
        "properties": {
            "connectionParameters": {
                "token": {
                    "type": "oauthSetting",
                    "oAuthSettings": {
                        "identityProvider": provider,
                        "clientId": client_id,
                        "scopes": ["read", "offline_access"] if scopes is None else scopes,
                        "customParameters": {k: {"value": v} for k, v in params.items()},
                    },
                }
            }
        }
    }
    return {"swagger": swagger, "api_properties": props}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AuthServer:
    """The running server and the knobs a test turns."""

    def __init__(self) -> None:
        self.state = State()
        self.server = _Server(self.state)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(
                make_app(self.server),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
        )
        self._thread = threading.Thread(target=self._uvicorn.run, daemon=True)

    def start(self) -> AuthServer:
        # authlib refuses http:// unless told it is a test: this server only listens on
        # loopback inside the test process.
        os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test authorization server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)

    def register(
        self, redirect_uri: str, secret: str | None = None, client_id: str | None = None
    ) -> Client:
        client = Client(client_id or f"client-{secrets.token_hex(4)}", secret, [redirect_uri])
        self.state.clients[client.client_id] = client
        return client

    def grants(self, kind: str) -> list[dict[str, str]]:
        return [form for path, grant, form in self.state.log if path == "/token" and grant == kind]

    def revoke_access_tokens(self) -> None:
        for token in self.state.tokens.values():
            token.revoked = True

    def revoke_refresh_tokens(self) -> None:
        for token in self.state.by_refresh.values():
            token.refresh_revoked = True


def running() -> Iterator[AuthServer]:
    server = AuthServer().start()
    try:
        yield server
    finally:
        server.stop()
