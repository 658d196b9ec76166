"""Windows authentication to internal APIs — NTLM, Kerberos, Negotiate — as an httpx.Auth flow.

The security contexts come from pyspnego, which hides whether GSSAPI (Linux: MIT Kerberos
through ``gssapi``, NTLM in pure Python) or SSPI (Windows) does the work; this module is the
HTTP side (RFC 4559 for Negotiate, MS-NTHT for NTLM) and the same on both platforms.

How one request is authenticated
--------------------------------

``WWW-Authenticate``/``Authorization`` carry base64 tokens; a mechanism needs one leg
(Kerberos: AP-REQ out, AP-REP back with the answer) or two (NTLM: NEGOTIATE → 401 CHALLENGE,
then AUTHENTICATE). NTLM authenticates the *connection*, not the request (MS-NTHT §2), and so do
Kerberos servers that keep the context (IIS by default, mod_auth_gssapi with
``GssapiConnectionBound``). Hence:

* every leg of a handshake goes over the same kept-alive connection; :mod:`agent.winpool` gives
  each request one connection that only requests of the *same credential* ever use, so a
  connection authenticated as one user never carries another user's request;
* on a connection that is already authenticated, the request is sent as is — the server knows
  the connection — and only a 401 starts a new handshake (counted in
  ``backhaul_agent_windows_handshakes_total``, so a thousand requests on kept-alive connections
  cost a handful of handshakes);
* cookies a server sets on a 401 (load-balancer affinity, session cookies) are sent back on the
  next leg of the same handshake, and on no other request.

Bodies: authenticate first, then send
-------------------------------------

The body of a request reaches the server on exactly one leg — the one that completes the
handshake (the Kerberos AP-REQ, the NTLM AUTHENTICATE) or the request on an authenticated
connection — so an upload of any size streams once and is never buffered. Every earlier leg
(the NTLM NEGOTIATE, and the unauthenticated probe below) is the same method and URL with
``Content-Length: 0``: a server that requires authentication answers it 401 without running it,
exactly as it does for IE/WinHTTP, which authenticate POSTs the same way. Why not
``Expect: 100-continue``: a server that answers 401 to it without reading the announced body
must close the connection (RFC 9110 §10.1.1), which loses the connection NTLM has just been
authenticated on; and why not HEAD: servers route and authorize HEAD separately from the real
method, so its 401 would not prove the real request will be challenged the same way. If a probe
is answered with anything but 401, the server did not ask for authentication; the agent then
reports that instead of passing the answer to an empty request off as the answer to the real one.

Small bodies (up to 64 KiB) are buffered by :mod:`agent.winpool` and can be sent again, so a
server that re-challenges an authenticated connection costs nothing but a round trip.

Channel bindings and mutual authentication
------------------------------------------

Over HTTPS every token is bound to the TLS connection it travels on (RFC 5929
``tls-server-end-point``: the hash of the server certificate, SHA-256 when its signature hash is
MD5 or SHA-1), which servers with Extended Protection for Authentication require. Kerberos puts
the bindings in its first token, so on a new HTTPS connection the first leg is an
unauthenticated probe that learns the certificate (and the schemes on offer); NTLM puts them in
its last token, so its NEGOTIATE leg is the probe. Kerberos is always mutual: the server's AP-REP
must come back with the final answer and verify, or the answer is refused — a response from a
server that cannot prove it holds the SPN's key is never handed to the caller.

Failures
--------

:func:`explain` turns a Kerberos/GSSAPI/SSPI/NTLM error into :class:`WindowsAuthFailed` with a
stable reason (``wrong_password``, ``unknown_user``, ``account_unusable``, ``clock_skew``,
``kdc_unreachable``, ``spn_not_found``, ``no_common_scheme``, ``credentials_rejected``,
``mutual_auth_failed``, ``no_challenge``, ``reauthentication_required``,
``service_identity_unavailable``, ``kerberos_error``) and a sentence for the caller. Messages
name the user, the realm and the SPN, never a password or a token.
"""

from __future__ import annotations

import base64
import hashlib
import sys
from collections.abc import AsyncGenerator, Callable, Generator, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

import httpx
import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from prometheus_client import Counter

from agent.errors import WindowsAuthFailed
from agent.metrics import REGISTRY

__all__ = [
    "HANDSHAKES",
    "LEGS",
    "Challenge",
    "ConnectionState",
    "SecurityContext",
    "WindowsAuth",
    "WindowsAuthFailed",
    "channel_bindings_data",
    "explain",
    "parse_challenges",
    "peer_certificate",
]

log = structlog.get_logger("backhaul.agent.winauth")

Scheme = Literal["negotiate", "ntlm", "kerberos"]
Mechanism = Literal["kerberos", "ntlm"]

#: Most legs any mechanism needs (SPNEGO with NTLM inside takes three); more is a broken server.
MAX_LEGS = 4
_NTLM_SIGNATURE = b"NTLMSSP\x00"
_NTLM_NEGOTIATE = _NTLM_SIGNATURE + b"\x01\x00\x00\x00"

HANDSHAKES = Counter(
    "backhaul_agent_windows_handshakes",
    "Windows authentication handshakes started (a new security context), by mechanism.",
    ["mechanism"],
    registry=REGISTRY,
)
LEGS = Counter(
    "backhaul_agent_windows_legs",
    "Requests sent to internal APIs for Windows authentication, by kind: token (an "
    "Authorization header), probe (an unauthenticated empty request), bare (the request on an "
    "already authenticated connection).",
    ["kind"],
    registry=REGISTRY,
)


# -- WWW-Authenticate ----------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` field (RFC 9110 §11.6.1)."""

    scheme: str  # lower case
    token: bytes | None = None


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Challenges in the given ``WWW-Authenticate`` field values, in order.

    A field may hold several comma-separated challenges, each a scheme optionally followed by a
    token68 (Negotiate/NTLM) or by auth-params (Basic realm="a, b"), which may contain commas
    inside quoted strings. An undecodable token68 is kept as a challenge without a token.
    """
    found: list[Challenge] = []
    for value in values:
        for item in _split_commas(value):
            head, _, rest = item.strip().partition(" ")
            if not head or "=" in head:
                continue  # an auth-param of the previous challenge
            rest = rest.strip()
            token: bytes | None = None
            if rest and "=" not in rest.rstrip("="):
                try:
                    token = base64.b64decode(rest, validate=True)
                except ValueError:
                    token = None
            found.append(Challenge(head.lower(), token))
    return found


def _split_commas(value: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


# -- channel bindings ----------------------------------------------------------------------


def peer_certificate(response: httpx.Response) -> bytes | None:
    """The DER certificate of the TLS connection ``response`` came over, if any."""
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    ssl_object = stream.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return bytes(der) if der else None


def channel_bindings_data(certificate_der: bytes) -> bytes:
    """``tls-server-end-point`` channel-binding data for a server certificate (RFC 5929 §4).

    The hash is the certificate's signature hash, except that MD5 and SHA-1 are replaced by
    SHA-256 (§4.1); a signature without its own hash (Ed25519) uses SHA-256 too.
    """
    cert = x509.load_der_x509_certificate(certificate_der)
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    name = "sha256" if algorithm is None or algorithm.name in ("md5", "sha1") else algorithm.name
    return b"tls-server-end-point:" + hashlib.new(name, certificate_der).digest()


# -- the security context seam -------------------------------------------------------------


class SecurityContext(Protocol):
    """What the flow needs of a pyspnego context (and what unit tests fake)."""

    @property
    def complete(self) -> bool: ...

    def step(self, in_token: bytes | None = None, *, channel_bindings: Any = None) -> bytes | None:
        """Consume the peer's token, return the next one to send (None when done)."""


class ContextFactory(Protocol):
    def __call__(self, mechanism: Mechanism, bindings: bytes | None) -> SecurityContext:
        """A new client context for ``mechanism``, bound to ``bindings`` when not None.

        Raises :class:`KerberosUnavailable` when Kerberos cannot be used at all here (no KDC,
        no SPN, no ticket for the service identity) and NTLM may be tried instead; any other
        failure is raised as :class:`WindowsAuthFailed`.
        """


class KerberosUnavailable(Exception):
    """Kerberos cannot be used for this request; Negotiate may fall back to NTLM."""

    def __init__(self, failure: WindowsAuthFailed) -> None:
        super().__init__(str(failure))
        self.failure = failure


@dataclass
class ConnectionState:
    """What the flow knows about the one connection it runs on, and what it learned.

    Filled in by :mod:`agent.winpool` before the request and read back after it.
    """

    #: The connection already completed a handshake and is still open.
    authenticated: bool = False
    #: The certificate of the (open) connection, if it is TLS and was seen before.
    peer_cert: bytes | None = None
    #: Set by the flow: the final answer came on an authenticated connection.
    authenticated_now: bool = False
    #: Set by the flow: an authenticated connection was challenged again (the server does not
    #: keep authentication per connection, so later requests should carry a token at once).
    rechallenged: bool = False
    handshakes: int = 0
    legs: list[str] = field(default_factory=list)


@dataclass
class _Call:
    """A blocking security-context operation; the driver runs it and sends back the result."""

    fn: Callable[[], Any]


# -- the flow -----------------------------------------------------------------------------


class WindowsAuth(httpx.Auth):
    """One request's Windows authentication. Create one per request; never share it."""

    requires_request_body = False
    requires_response_body = False

    def __init__(
        self,
        scheme: Scheme,
        factory: ContextFactory,
        *,
        state: ConnectionState | None = None,
        spn: str = "HTTP/unspecified",
        principal: str = "",
        ntlm_possible: bool = True,
        run_blocking: Callable[[Callable[[], Any]], Any] | None = None,
    ) -> None:
        self.scheme = scheme
        self.factory = factory
        self.state = state if state is not None else ConnectionState()
        self.spn = spn
        self.principal = principal
        self.ntlm_possible = ntlm_possible
        #: Async drivers run blocking calls through this (a worker thread); None runs inline.
        self._run_blocking = run_blocking

    # The drivers: the logic lives in one generator that yields requests to send and _Call
    # objects to run; sync runs them inline, async hands them to a worker thread because
    # Kerberos talks to the KDC.

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self._flow(request)
        item = _advance(flow, None, None)
        while item is not _DONE:
            if isinstance(item, _Call):
                try:
                    result = item.fn()
                except Exception as exc:
                    item = _advance(flow, None, exc)
                    continue
                item = _advance(flow, result, None)
                continue
            response = yield item
            item = _advance(flow, response, None)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self._flow(request)
        item = _advance(flow, None, None)
        while item is not _DONE:
            if isinstance(item, _Call):
                try:
                    if self._run_blocking is None:
                        result = item.fn()
                    else:
                        result = await self._run_blocking(item.fn)
                except Exception as exc:
                    item = _advance(flow, None, exc)
                    continue
                item = _advance(flow, result, None)
                continue
            response = yield item
            item = _advance(flow, response, None)

    # -- the logic

    def _flow(self, request: httpx.Request) -> Generator[Any, Any, None]:
        state = self.state
        replayable = isinstance(request.stream, httpx.ByteStream)
        has_body = _has_body(request)
        https = request.url.scheme == "https"
        offered: list[Challenge] | None = None
        cert = state.peer_cert
        cookies = _LegCookies()

        if state.authenticated:
            state.legs.append("bare")
            LEGS.labels("bare").inc()
            response = yield request
            if response.status_code != 401:
                state.authenticated_now = True
                return
            state.rechallenged = True
            if not replayable:
                raise WindowsAuthFailed(
                    "reauthentication_required",
                    f"{_where(request)} asked to authenticate again on a connection it had "
                    "accepted, after the request body was sent; retry the request",
                )
            offered = parse_challenges(response.headers.get_list("www-authenticate"))
            cert = peer_certificate(response) or cert
            cookies.take(response)

        mechanism = self._first_mechanism(offered)
        if (
            offered is None
            and mechanism == "kerberos"
            and ((https and cert is None) or not replayable)
        ):
            # Learn the certificate (for the bindings in the first Kerberos token) and the
            # schemes on offer before any token or the body is sent.
            probe = request if replayable else _empty_copy(request)
            state.legs.append("probe")
            LEGS.labels("probe").inc()
            response = yield probe
            cert = peer_certificate(response) or cert
            if response.status_code != 401:
                if probe is request:
                    return  # no authentication asked for: that is the answer
                raise _no_challenge(request, response)
            offered = parse_challenges(response.headers.get_list("www-authenticate"))
            cookies.take(response)
            mechanism = self._first_mechanism(offered)

        switched = False
        while True:
            refused = yield from self._handshake(
                request, mechanism, offered, cert, cookies, replayable, has_body
            )
            if refused is None:
                return
            # Refused without a word: Negotiate falls back from Kerberos to NTLM, and a scheme
            # the server does not offer gives way (once) to one it does.
            if mechanism == "kerberos" and self._may_fall_back(refused):
                nxt: Mechanism = "ntlm"
            else:
                nxt = self._first_mechanism(refused)
            if switched or _header_for(nxt, refused) is None:
                raise _no_common_scheme(request, self.scheme, refused)
            switched, offered, mechanism = True, refused, nxt

    def _may_fall_back(self, offered: list[Challenge]) -> bool:
        schemes = {c.scheme for c in offered}
        return (
            self.scheme == "negotiate"
            and self.ntlm_possible
            and bool(schemes & {"ntlm", "negotiate"})
        )

    def _first_mechanism(self, offered: list[Challenge] | None) -> Mechanism:
        if self.scheme == "ntlm":
            return "ntlm"
        if self.scheme == "kerberos":
            return "kerberos"
        schemes = {c.scheme for c in offered or []}
        if offered is not None and "negotiate" not in schemes and "ntlm" in schemes:
            return "ntlm" if self.ntlm_possible else "kerberos"
        return "kerberos"

    def _handshake(
        self,
        request: httpx.Request,
        mechanism: Mechanism,
        offered: list[Challenge] | None,
        cert: bytes | None,
        cookies: _LegCookies,
        replayable: bool,
        has_body: bool,
    ) -> Generator[Any, Any, list[Challenge] | None]:
        """Run one security context to the end. Returns None when done, or the challenges of
        a 401 that refused the scheme outright (the caller may switch mechanism)."""
        state = self.state
        header = _header_for(mechanism, offered)
        if header is None:
            raise _no_common_scheme(request, self.scheme, offered or [])
        bindings = channel_bindings_data(cert) if cert is not None else None
        try:
            ctx, token = yield _Call(partial(self._start, mechanism, bindings))
        except KerberosUnavailable as exc:
            header = _header_for("ntlm", offered)
            if self.scheme != "negotiate" or not self.ntlm_possible or header is None:
                raise exc.failure from None
            log.info("winauth.kerberos_unavailable", reason=exc.failure.reason, fallback="ntlm")
            mechanism = "ntlm"
            ctx, token = yield _Call(partial(self._start, "ntlm", bindings))
        state.handshakes += 1
        HANDSHAKES.labels(mechanism).inc()
        body_sent = False
        for _ in range(MAX_LEGS):
            if token is None:
                raise WindowsAuthFailed(
                    "kerberos_error" if mechanism == "kerberos" else "credentials_rejected",
                    f"the {mechanism} context of {self.principal or 'the service identity'} "
                    f"produced no token for {_where(request)}",
                )
            # Only the leg that can complete the handshake carries the body (see above).
            final = _NTLM_NEGOTIATE not in token
            leg = request if (final or not has_body) else _empty_copy(request)
            if leg is request and body_sent and not replayable:
                raise WindowsAuthFailed(
                    "reauthentication_required",
                    f"{_where(request)} asked for another authentication round after the "
                    "request body was sent; retry the request",
                )
            leg.headers["Authorization"] = f"{header} {base64.b64encode(token).decode()}"
            cookies.apply(leg)
            state.legs.append("token")
            LEGS.labels("token").inc()
            response = yield leg
            body_sent = body_sent or (leg is request and has_body)
            cookies.take(response)
            if cert is None:
                cert = peer_certificate(response)
                if cert is not None:
                    bindings = channel_bindings_data(cert)
            challenges = parse_challenges(response.headers.get_list("www-authenticate"))
            answer = _token_for(header, challenges)
            if response.status_code == 401:
                if answer is not None and not ctx.complete:
                    token = yield _Call(partial(self._step, ctx, answer, bindings))
                    continue
                if answer is not None:
                    # A complete context answered with an error token (KRB-ERROR): step it to
                    # surface the reason (clock skew, wrong key).
                    yield _Call(partial(self._step, ctx, answer, bindings))
                offered_ours = any(c.scheme == header.lower() for c in challenges)
                fall_back = mechanism == "kerberos" and self._may_fall_back(challenges)
                if challenges and (fall_back or not offered_ours):
                    if leg is request and has_body and not replayable:
                        raise (
                            self._rejected(request, mechanism)
                            if offered_ours
                            else _no_common_scheme(request, self.scheme, challenges)
                        )
                    log.info("winauth.scheme_refused", mechanism=mechanism, url=_where(request))
                    return challenges
                raise self._rejected(request, mechanism)
            if not final and leg is not request:
                raise _no_challenge(request, response)
            if mechanism == "kerberos":
                # RFC 4559 §5: the final answer carries the server's AP-REP; it must verify.
                if answer is None and not ctx.complete:
                    raise WindowsAuthFailed(
                        "mutual_auth_failed",
                        f"{_where(request)} answered {response.status_code} without proving "
                        f"it holds the key of {self.spn} (no Kerberos mutual-authentication "
                        "token); the answer was discarded",
                    )
                if answer is not None and not ctx.complete:
                    yield _Call(partial(self._verify, ctx, answer, request))
            state.authenticated_now = True
            return None
        raise WindowsAuthFailed(
            "credentials_rejected",
            f"{_where(request)} did not finish {mechanism} authentication in {MAX_LEGS} rounds",
        )

    def _start(
        self, mechanism: Mechanism, bindings: bytes | None
    ) -> tuple[SecurityContext, bytes | None]:
        try:
            ctx = self.factory(mechanism, bindings)
            token = ctx.step(None)
        except KerberosUnavailable:
            raise
        except Exception as exc:
            failure = explain(exc, principal=self.principal, spn=self.spn)
            if mechanism == "kerberos" and failure.reason in _KERBEROS_UNAVAILABLE:
                raise KerberosUnavailable(failure) from None
            raise failure from None
        return ctx, token

    def _step(self, ctx: SecurityContext, token: bytes, bindings: bytes | None) -> bytes | None:
        try:
            return ctx.step(token, channel_bindings=_gss_bindings(bindings))
        except Exception as exc:
            raise explain(exc, principal=self.principal, spn=self.spn) from None

    def _verify(self, ctx: SecurityContext, token: bytes, request: httpx.Request) -> None:
        try:
            ctx.step(token)
        except Exception as exc:
            failure = explain(exc, principal=self.principal, spn=self.spn)
            raise WindowsAuthFailed(
                "mutual_auth_failed",
                f"{_where(request)} did not prove it holds the key of {self.spn}: "
                f"{failure.message.split('] ', 1)[-1]}; the answer was discarded",
            ) from None
        if not ctx.complete:
            raise WindowsAuthFailed(
                "mutual_auth_failed",
                f"the Kerberos mutual authentication with {_where(request)} did not complete; "
                "the answer was discarded",
            )

    def _rejected(self, request: httpx.Request, mechanism: Mechanism) -> WindowsAuthFailed:
        who = self.principal or "the agent's service identity"
        if mechanism == "ntlm":
            return WindowsAuthFailed(
                "credentials_rejected",
                f"{_where(request)} refused NTLM authentication as {who}: wrong user name or "
                "password, an unknown user, or an account this API does not admit",
            )
        return WindowsAuthFailed(
            "credentials_rejected",
            f"{_where(request)} refused the Kerberos ticket of {who} for {self.spn}: the "
            "service's keytab does not match the SPN, or the user is not admitted",
        )


# -- helpers ---------------------------------------------------------------------------------

_DONE = object()


def _advance(flow: Generator[Any, Any, None], value: Any, exc: BaseException | None) -> Any:
    """Resume the flow with a value or an exception; ``_DONE`` once it has finished."""
    try:
        if exc is not None:
            return flow.throw(exc)
        if value is None:
            return next(flow)
        return flow.send(value)
    except StopIteration:
        return _DONE


class _LegCookies:
    """Cookies set during one handshake, sent back on its later legs (and nowhere else)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def take(self, response: httpx.Response) -> None:
        for header in response.headers.get_list("set-cookie"):
            pair = header.split(";", 1)[0].strip()
            name, sep, value = pair.partition("=")
            if sep and name.strip():
                self.values[name.strip()] = value.strip()

    def apply(self, request: httpx.Request) -> None:
        if self.values:
            request.headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.values.items())


def _has_body(request: httpx.Request) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return str(length).strip() != "0"
    return "transfer-encoding" in request.headers


def _empty_copy(request: httpx.Request) -> httpx.Request:
    """The same method, URL and headers with ``Content-Length: 0`` (an authentication leg)."""
    drop = {b"content-length", b"transfer-encoding", b"expect", b"content-encoding"}
    headers = [(k, v) for k, v in request.headers.raw if k.lower() not in drop]
    headers.append((b"Content-Length", b"0"))
    return httpx.Request(
        request.method, request.url, headers=headers, extensions=dict(request.extensions)
    )


def _header_for(mechanism: Mechanism, offered: list[Challenge] | None) -> str | None:
    """The Authorization scheme to use, given what the server offered (None: unknown yet)."""
    if offered is None:
        return "NTLM" if mechanism == "ntlm" else "Negotiate"
    schemes = {c.scheme for c in offered}
    if mechanism == "kerberos":
        return "Negotiate" if "negotiate" in schemes else None
    if "ntlm" in schemes:
        return "NTLM"
    return "Negotiate" if "negotiate" in schemes else None


def _token_for(header: str, challenges: list[Challenge]) -> bytes | None:
    for challenge in challenges:
        if challenge.scheme == header.lower() and challenge.token:
            return challenge.token
    return None


def _where(request: httpx.Request) -> str:
    url = request.url
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"


def _gss_bindings(data: bytes | None) -> Any:
    if data is None:
        return None
    from spnego.channel_bindings import GssChannelBindings

    return GssChannelBindings(application_data=data)


def _no_challenge(request: httpx.Request, response: httpx.Response) -> WindowsAuthFailed:
    return WindowsAuthFailed(
        "no_challenge",
        f"{_where(request)} answered an empty authentication probe with "
        f"{response.status_code} instead of asking for Windows authentication, so the request "
        "was not sent; check that the connector's auth type matches the API",
    )


def _no_common_scheme(
    request: httpx.Request, scheme: Scheme, offered: list[Challenge]
) -> WindowsAuthFailed:
    names = sorted({c.scheme.capitalize() if c.scheme != "ntlm" else "NTLM" for c in offered})
    wanted = {
        "negotiate": "Negotiate (Kerberos or NTLM)",
        "ntlm": "NTLM",
        "kerberos": "Negotiate with Kerberos",
    }
    return WindowsAuthFailed(
        "no_common_scheme",
        f"{_where(request)} offers {', '.join(names) or 'no authentication scheme'}; this "
        f"connection does {wanted[scheme]}",
    )


# -- error mapping -------------------------------------------------------------------------

_KRB5_BASE = -1765328384  # KRB5KDC_ERR_NONE; KDC error n is _KRB5_BASE + n (RFC 4120 §7.5.9)
_KRB5_CODES: dict[int, str] = {
    _KRB5_BASE + 6: "unknown_user",  # KDC_ERR_C_PRINCIPAL_UNKNOWN
    _KRB5_BASE + 7: "spn_not_found",  # KDC_ERR_S_PRINCIPAL_UNKNOWN
    _KRB5_BASE + 1: "account_unusable",  # KDC_ERR_NAME_EXP
    _KRB5_BASE + 18: "account_unusable",  # KDC_ERR_CLIENT_REVOKED (disabled, locked out)
    _KRB5_BASE + 23: "account_unusable",  # KDC_ERR_KEY_EXPIRED (password expired)
    _KRB5_BASE + 24: "wrong_password",  # KDC_ERR_PREAUTH_FAILED
    _KRB5_BASE + 31: "wrong_password",  # KRB_AP_ERR_BAD_INTEGRITY (no pre-auth realms)
    _KRB5_BASE + 37: "clock_skew",  # KRB_AP_ERR_SKEW
    -1765328228: "kdc_unreachable",  # KRB5_KDC_UNREACH
    -1765328230: "kdc_unreachable",  # KRB5_REALM_UNKNOWN
    -1765328164: "kdc_unreachable",  # KRB5_REALM_CANT_RESOLVE
    -1765328160: "kdc_unreachable",  # KRB5_CONFIG_NODEFREALM
}
#: SSPI (Windows) status codes, as pyspnego reports them.
_SSPI_CODES: dict[int, str] = {
    0x8009030C: "credentials_rejected",  # SEC_E_LOGON_DENIED
    0x80090303: "spn_not_found",  # SEC_E_TARGET_UNKNOWN
    0x80090324: "clock_skew",  # SEC_E_TIME_SKEW
    0x80090311: "kdc_unreachable",  # SEC_E_NO_AUTHENTICATING_AUTHORITY
    0x8009030E: "service_identity_unavailable",  # SEC_E_NO_CREDENTIALS
}
#: Message fragments for implementations that report no usable code (Heimdal, NTLM).
_TEXT: list[tuple[str, str]] = [
    ("clock skew", "clock_skew"),
    ("preauthentication failed", "wrong_password"),
    ("password incorrect", "wrong_password"),
    ("integrity check failed", "wrong_password"),
    ("cannot contact any kdc", "kdc_unreachable"),
    ("cannot find kdc", "kdc_unreachable"),
    ("cannot resolve network address for kdc", "kdc_unreachable"),
    ("not found in kerberos database", "unknown_user"),
    ("password has expired", "account_unusable"),
    ("credentials have been revoked", "account_unusable"),
    ("no kerberos credentials available", "service_identity_unavailable"),
    ("no credentials were supplied", "service_identity_unavailable"),
    ("no credentials cache found", "service_identity_unavailable"),
    ("keytab", "service_identity_unavailable"),
]
_KERBEROS_UNAVAILABLE = frozenset(
    {"kdc_unreachable", "spn_not_found", "service_identity_unavailable"}
)

_SENTENCES = {
    "wrong_password": "the KDC refused the password of {principal} (wrong password)",
    "unknown_user": "the KDC does not know the user {principal} (unknown user)",
    "account_unusable": "the KDC refused {principal}: the account is disabled, locked out or "
    "expired, or its password has expired",
    "clock_skew": "the clocks of the agent and the KDC or the API differ by more than the "
    "realm allows (clock skew, usually 5 minutes); synchronize them with NTP",
    "kdc_unreachable": "no KDC of the realm of {principal} could be reached; check the realm "
    "and kdc entries of krb5.conf (KRB5_CONFIG) and that the agent can reach port 88",
    "spn_not_found": "the KDC has no service principal {spn}; register it for the API's "
    "service account (setspn -S {spn} <account>) or set the connector's spn",
    "service_identity_unavailable": "the agent's service identity has no Kerberos credentials "
    "here; set kerberos.client_keytab (KRB5_CLIENT_KTNAME) or kerberos.ccache (KRB5CCNAME) in "
    "agent.toml, or run the agent as a domain service account on Windows",
    "credentials_rejected": "the authentication of {principal} for {spn} was refused",
    "kerberos_error": "Kerberos failed for {principal} and {spn}",
}


def _codes(exc: BaseException) -> Generator[BaseException, None, None]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo.extend([getattr(item, "base_error", None), item.__cause__, item.__context__])


def _signed(code: int) -> int:
    return code - (1 << 32) if code >= (1 << 31) else code


def explain(exc: BaseException, *, principal: str, spn: str) -> WindowsAuthFailed:
    """Map an error of krb5, gssapi, SSPI or pyspnego to a reason and a sentence (no secrets)."""
    if isinstance(exc, WindowsAuthFailed):
        return exc
    reason: str | None = None
    detail = ""
    for item in _codes(exc):
        for attr in ("err_code", "min_code"):
            code = getattr(item, attr, None)
            if isinstance(code, int) and _signed(code) in _KRB5_CODES:
                reason = reason or _KRB5_CODES[_signed(code)]
        winerror = getattr(item, "winerror", None)
        if isinstance(winerror, int) and (winerror & 0xFFFFFFFF) in _SSPI_CODES:
            reason = reason or _SSPI_CODES[winerror & 0xFFFFFFFF]
        if type(item).__name__ == "BadBindingsError":
            reason = reason or "credentials_rejected"
        text = str(getattr(item, "message", "") or item)
        if not detail and text:
            detail = text
    lowered = detail.lower()
    if reason is None:
        for fragment, slug in _TEXT:
            if fragment in lowered:
                reason = slug
                break
    if reason == "unknown_user" and ("server" in lowered and "not found" in lowered):
        reason = "spn_not_found"
    reason = reason or "kerberos_error"
    sentence = _SENTENCES.get(reason, _SENTENCES["kerberos_error"]).format(
        principal=principal or "the service identity", spn=spn
    )
    if reason in ("spn_not_found", "kerberos_error", "credentials_rejected") and detail:
        sentence += f" ({_clean(detail)})"
    return WindowsAuthFailed(reason, sentence)


def _clean(text: str) -> str:
    """The library's own words, one line, without its noisy major-code preamble."""
    line = " ".join(text.split())
    for marker in ("Minor (", "Context: "):
        if marker in line:
            line = line.split(marker, 1)[1].split("): ", 1)[-1]
            break
    return line[:240]


if sys.platform == "win32":  # pragma: no cover - documented in docs/windows-auth.md
    PLATFORM = "sspi"
else:
    PLATFORM = "gssapi"
