"""The Windows-auth flow (agent.winauth) and its connection pool (agent.winpool), without a
network: httpx.MockTransport plays the server, with pyspnego's real NTLM acceptor for NTLM and
a scripted security context for Kerberos (the real KDC is in tests/real)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import spnego
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from spnego.channel_bindings import GssChannelBindings

from agent.errors import CredentialsInvalid, WindowsAuthFailed
from agent.head import AuthSpec, RequestHead
from agent.tickets import apply_environment, credential_key
from agent.winauth import (
    HANDSHAKES,
    Challenge,
    ConnectionState,
    KerberosUnavailable,
    WindowsAuth,
    channel_bindings_data,
    explain,
    parse_challenges,
)
from agent.winpool import REPLAYABLE_BODY_BYTES, WindowsCredential, WindowsPool, _buffer_small
from backhaul.logging import configure

PASSWORD = "Winauth-unit-pw-77!"
USER = "CORP\\alice"


# -- helpers -------------------------------------------------------------------------------


def make_cert(algorithm: hashes.HashAlgorithm | None = None, rsa_key: bool = False) -> bytes:
    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.corp.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, algorithm or hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def snap(request: httpx.Request) -> httpx.Request:
    """A copy as sent: the flow reuses one request object across legs and edits its headers."""
    return httpx.Request(
        request.method, request.url, headers=request.headers.copy(), content=request.content
    )


class FakeStream:
    """What httpcore puts in ``response.extensions["network_stream"]`` for a TLS connection."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def get_extra_info(self, name: str) -> Any:
        if name == "ssl_object":
            return self
        return None

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


@pytest.fixture
def ntlm_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ntlm-users"
    path.write_text(f"CORP:alice:{PASSWORD}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(path))
    return path


class NTLMServer:
    """An IIS-like NTLM endpoint over one connection: pyspnego's acceptor, connection-bound.

    ``cert`` makes it a TLS server (the flow reads the certificate from the response), and
    ``require_bindings`` gives the acceptor that certificate's tls-server-end-point bindings.
    """

    def __init__(
        self,
        cert: bytes | None = None,
        *,
        require_bindings: bool = False,
        offer: tuple[str, ...] = ("NTLM",),
        cookie: str | None = None,
    ) -> None:
        self.cert = cert
        self.require_bindings = require_bindings
        self.offer = offer
        self.cookie = cookie
        self.ctx: Any = None
        self.user: str | None = None
        self.seen: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def _response(self, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> Any:
        extensions = {"network_stream": FakeStream(self.cert)} if self.cert else {}
        return httpx.Response(status, headers=headers, content=body, extensions=extensions)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(snap(request))
        self.bodies.append(request.content)
        if self.user is not None:
            return self._response(200, [], f"hello {self.user}".encode())
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme not in self.offer or not value:
            return self._response(401, [("WWW-Authenticate", s) for s in self.offer])
        token = base64.b64decode(value)
        if token[8:12] == b"\x01\x00\x00\x00":
            bindings = (
                GssChannelBindings(application_data=channel_bindings_data(self.cert))
                if self.require_bindings and self.cert
                else None
            )
            self.ctx = spnego.server(
                protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm, channel_bindings=bindings
            )
            out = self.ctx.step(token)
            headers = [("WWW-Authenticate", f"{scheme} {base64.b64encode(out).decode()}")]
            if self.cookie:
                headers.append(("Set-Cookie", f"{self.cookie}; Path=/; HttpOnly"))
            return self._response(401, headers)
        try:
            self.ctx.step(token)
        except spnego.exceptions.SpnegoError:
            return self._response(401, [("WWW-Authenticate", s) for s in self.offer])
        self.user = str(self.ctx.client_principal)
        return self._response(200, [], f"hello {self.user}".encode())


def ntlm_factory(username: str = USER, password: str = PASSWORD) -> Any:
    def factory(mechanism: str, bindings: bytes | None) -> Any:
        assert mechanism == "ntlm"
        cb = GssChannelBindings(application_data=bindings) if bindings else None
        return spnego.client(
            username,
            password,
            hostname="api.corp.test",
            service="HTTP",
            channel_bindings=cb,
            protocol="ntlm",
            options=spnego.NegotiateOptions.use_ntlm,
        )

    return factory


class FakeKerberos:
    """A scripted Kerberos client context: one AP-REQ out, one AP-REP expected back."""

    def __init__(self, log: list[Any], *, reject_reply: bool = False) -> None:
        self.log = log
        self.reject_reply = reject_reply
        self._complete = False

    @property
    def complete(self) -> bool:
        return self._complete

    def step(self, in_token: bytes | None = None, *, channel_bindings: Any = None) -> bytes | None:
        self.log.append(("step", in_token))
        if in_token is None:
            return b"\x60AP-REQ"
        if self.reject_reply or in_token != b"AP-REP":
            raise ValueError("GSSAPI: the AP-REP does not verify")
        self._complete = True
        return None


def kerberos_factory(log: list[Any], **kwargs: Any) -> Callable[[str, bytes | None], Any]:
    def factory(mechanism: str, bindings: bytes | None) -> Any:
        log.append(("new", mechanism, bindings))
        return FakeKerberos(log, **kwargs)

    return factory


def kerberos_server(
    seen: list[httpx.Request],
    *,
    cert: bytes | None = None,
    mutual: bytes | None = b"AP-REP",
    offer: tuple[str, ...] = ("Negotiate",),
) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(snap(request))
        extensions = {"network_stream": FakeStream(cert)} if cert else {}
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Negotiate "):
            return httpx.Response(
                401, headers=[("WWW-Authenticate", s) for s in offer], extensions=extensions
            )
        headers = []
        if mutual is not None:
            headers.append(("WWW-Authenticate", "Negotiate " + base64.b64encode(mutual).decode()))
        return httpx.Response(200, headers=headers, content=request.content, extensions=extensions)

    return handler


async def send(
    handler: Callable[[httpx.Request], httpx.Response],
    auth: WindowsAuth,
    url: str = "http://api.corp.test/v1/items",
    method: str = "GET",
    content: Any = None,
) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await client.request(method, url, content=content, auth=auth)


async def stream_body(chunks: list[bytes], pulled: list[int]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        pulled.append(len(chunk))
        yield chunk


# -- WWW-Authenticate and channel bindings ----------------------------------------------------


def test_challenges_split_schemes_tokens_and_quoted_params() -> None:
    token = base64.b64encode(b"\x01\x02").decode()
    found = parse_challenges(
        [f'Basic realm="a, b", charset="UTF-8", Negotiate {token}', "NTLM", "Bearer"]
    )
    assert found == [
        Challenge("basic"),
        Challenge("negotiate", b"\x01\x02"),
        Challenge("ntlm"),
        Challenge("bearer"),
    ]
    assert parse_challenges(["Negotiate !!notbase64"]) == [Challenge("negotiate")]


@pytest.mark.parametrize(
    ("algorithm", "rsa_key", "expected"),
    [
        (hashes.SHA256(), False, "sha256"),
        (hashes.SHA384(), False, "sha384"),
        (hashes.SHA512(), True, "sha512"),
    ],
)
def test_tls_server_end_point_uses_the_signature_hash(
    algorithm: hashes.HashAlgorithm, rsa_key: bool, expected: str
) -> None:
    der = make_cert(algorithm, rsa_key)
    data = channel_bindings_data(der)
    assert data == b"tls-server-end-point:" + hashlib.new(expected, der).digest()


def test_tls_server_end_point_replaces_sha1_by_sha256() -> None:
    # RFC 5929 §4.1. cryptography no longer signs with SHA-1, so relabel a SHA-256 RSA
    # certificate's algorithm (sha256WithRSAEncryption ...1.11 -> sha1WithRSAEncryption ...1.5);
    # the bindings hash the DER as it is and never check the signature.
    sha256_rsa = bytes.fromhex("06092a864886f70d01010b")
    der = make_cert(hashes.SHA256(), rsa_key=True).replace(sha256_rsa, sha256_rsa[:-1] + b"\x05")
    assert x509.load_der_x509_certificate(der).signature_hash_algorithm.name == "sha1"  # type: ignore[union-attr]
    assert channel_bindings_data(der) == b"tls-server-end-point:" + hashlib.sha256(der).digest()


# -- NTLM with pyspnego's real acceptor ------------------------------------------------------


async def test_ntlm_two_legs_then_the_connection_stays_authenticated(ntlm_users: Path) -> None:
    server = NTLMServer()
    state = ConnectionState()
    before = HANDSHAKES.labels("ntlm")._value.get()
    r = await send(server, WindowsAuth("ntlm", ntlm_factory(), state=state))
    assert (r.status_code, r.text) == (200, "hello CORP\\alice")
    assert [req.headers["authorization"][:5] for req in server.seen] == ["NTLM ", "NTLM "]
    assert state.authenticated_now and state.legs == ["token", "token"]
    assert HANDSHAKES.labels("ntlm")._value.get() == before + 1

    # The next request on that connection goes without a token, and no new handshake.
    again = ConnectionState(authenticated=True)
    r = await send(server, WindowsAuth("ntlm", ntlm_factory(), state=again))
    assert r.status_code == 200 and "authorization" not in server.seen[-1].headers
    assert again.legs == ["bare"] and again.handshakes == 0
    assert HANDSHAKES.labels("ntlm")._value.get() == before + 1


async def test_ntlm_wrong_password_is_a_clear_refusal(ntlm_users: Path) -> None:
    server = NTLMServer()
    auth = WindowsAuth("ntlm", ntlm_factory(password="not-it"), principal=USER)
    with pytest.raises(WindowsAuthFailed) as err:
        await send(server, auth)
    assert err.value.reason == "credentials_rejected"
    assert "refused NTLM authentication as CORP\\alice" in err.value.message
    assert "not-it" not in err.value.message


async def test_cookies_set_during_the_handshake_come_back_on_the_next_leg(
    ntlm_users: Path,
) -> None:
    server = NTLMServer(cookie="affinity=node-7")
    r = await send(server, WindowsAuth("ntlm", ntlm_factory()))
    assert r.status_code == 200
    assert "cookie" not in server.seen[0].headers
    assert server.seen[1].headers["cookie"] == "affinity=node-7"


async def test_ntlm_in_negotiate_when_the_server_offers_only_negotiate(ntlm_users: Path) -> None:
    server = NTLMServer(offer=("Negotiate",))
    r = await send(server, WindowsAuth("ntlm", ntlm_factory()))
    assert r.status_code == 200
    # The first NTLM leg was refused unread; the handshake restarted with the offered scheme.
    assert [q.headers["authorization"].split()[0] for q in server.seen] == [
        "NTLM",
        "Negotiate",
        "Negotiate",
    ]


async def test_upload_body_goes_only_with_the_authenticate_leg(ntlm_users: Path) -> None:
    server = NTLMServer()
    pulled: list[int] = []
    body = stream_body([b"a" * 70_000, b"b" * 70_000], pulled)
    r = await send(server, WindowsAuth("ntlm", ntlm_factory()), method="POST", content=body)
    assert r.status_code == 200
    negotiate, _ = server.seen
    # The NEGOTIATE leg is an empty POST to the same URL: nothing of the body was read for it.
    assert (negotiate.method, negotiate.url.path) == ("POST", "/v1/items")
    assert negotiate.headers["content-length"] == "0" and server.bodies[0] == b""
    assert server.bodies[1] == b"a" * 70_000 + b"b" * 70_000
    assert pulled == [70_000, 70_000]


async def test_channel_bindings_from_the_connection_certificate(ntlm_users: Path) -> None:
    cert = make_cert()
    server = NTLMServer(cert, require_bindings=True)
    r = await send(server, WindowsAuth("ntlm", ntlm_factory()), url="https://api.corp.test/")
    assert r.status_code == 200


async def test_server_requiring_bindings_refuses_a_client_without_them(ntlm_users: Path) -> None:
    cert = make_cert()
    # A plain pyspnego client that is never given the bindings, as the httpx NTLM packages.
    server = NTLMServer(cert, require_bindings=True)
    ctx = spnego.client(
        USER, PASSWORD, hostname="api.corp.test", protocol="ntlm",
        options=spnego.NegotiateOptions.use_ntlm,
    )  # fmt: skip
    first = server(
        httpx.Request("GET", "https://api.corp.test/", headers={
            "Authorization": "NTLM " + base64.b64encode(ctx.step()).decode()})
    )  # fmt: skip
    challenge = base64.b64decode(first.headers["www-authenticate"].split()[1])
    last = server(
        httpx.Request("GET", "https://api.corp.test/", headers={
            "Authorization": "NTLM " + base64.b64encode(ctx.step(challenge)).decode()})
    )  # fmt: skip
    assert last.status_code == 401 and server.user is None

    # Ours, given another certificate's bindings (a TLS-terminating man in the middle), too.
    server = NTLMServer(cert, require_bindings=True)
    other = make_cert()

    def wrong(mechanism: str, bindings: bytes | None) -> Any:
        return ntlm_factory()(mechanism, channel_bindings_data(other))

    class Pinned(WindowsAuth):
        def _step(self, ctx: Any, token: bytes, bindings: bytes | None) -> bytes | None:
            return super()._step(ctx, token, channel_bindings_data(other))

    with pytest.raises(WindowsAuthFailed) as err:
        await send(server, Pinned("ntlm", wrong), url="https://api.corp.test/")
    assert err.value.reason == "credentials_rejected"


def test_sync_clients_run_the_same_flow(ntlm_users: Path) -> None:
    server = NTLMServer()
    with httpx.Client(transport=httpx.MockTransport(server)) as client:
        r = client.get("http://api.corp.test/", auth=WindowsAuth("ntlm", ntlm_factory()))
    assert r.status_code == 200 and len(server.seen) == 2


# -- Kerberos, scripted ------------------------------------------------------------------------


async def test_kerberos_is_one_leg_and_the_server_must_prove_itself() -> None:
    log: list[Any] = []
    seen: list[httpx.Request] = []
    state = ConnectionState()
    auth = WindowsAuth("kerberos", kerberos_factory(log), state=state)
    r = await send(kerberos_server(seen), auth)
    assert r.status_code == 200 and len(seen) == 1
    assert seen[0].headers["authorization"].startswith("Negotiate ")
    assert log == [("new", "kerberos", None), ("step", None), ("step", b"AP-REP")]
    assert state.authenticated_now


@pytest.mark.parametrize("mutual", [None, b"forged"])
async def test_an_answer_without_a_valid_ap_rep_is_refused(mutual: bytes | None) -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(WindowsAuthFailed) as err:
        await send(
            kerberos_server(seen, mutual=mutual), WindowsAuth("kerberos", kerberos_factory([]))
        )
    assert err.value.reason == "mutual_auth_failed"
    assert "discarded" in err.value.message


async def test_kerberos_over_https_binds_to_the_certificate_seen_by_a_probe() -> None:
    cert = make_cert()
    log: list[Any] = []
    seen: list[httpx.Request] = []
    auth = WindowsAuth("kerberos", kerberos_factory(log))
    r = await send(kerberos_server(seen, cert=cert), auth, url="https://api.corp.test/x")
    assert r.status_code == 200
    assert "authorization" not in seen[0].headers  # the probe
    assert log[0] == ("new", "kerberos", channel_bindings_data(cert))

    # Known certificate of a kept connection: no probe.
    seen.clear()
    auth = WindowsAuth("kerberos", kerberos_factory([]), state=ConnectionState(peer_cert=cert))
    await send(kerberos_server(seen, cert=cert), auth, url="https://api.corp.test/x")
    assert len(seen) == 1 and "authorization" in seen[0].headers


async def test_a_streamed_upload_waits_for_the_challenge_before_the_body() -> None:
    seen: list[httpx.Request] = []
    pulled: list[int] = []
    body = stream_body([b"x" * 100_000], pulled)
    auth = WindowsAuth("kerberos", kerberos_factory([]))
    r = await send(kerberos_server(seen), auth, method="PUT", content=body)
    assert r.status_code == 200
    probe, real = seen
    assert "authorization" not in probe.headers and probe.headers["content-length"] == "0"
    assert real.headers["authorization"].startswith("Negotiate ") and len(real.content) == 100_000


async def test_a_probe_that_is_not_challenged_stops_the_upload() -> None:
    def anonymous(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201)

    body = stream_body([b"x" * 100_000], [])
    with pytest.raises(WindowsAuthFailed) as err:
        await send(
            anonymous, WindowsAuth("kerberos", kerberos_factory([])), "http://a/", "POST", body
        )
    assert err.value.reason == "no_challenge"


async def test_a_server_offering_only_basic_is_no_common_scheme() -> None:
    def basic_only(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="x"'})

    with pytest.raises(WindowsAuthFailed) as err:
        await send(basic_only, WindowsAuth("negotiate", kerberos_factory([])))
    assert err.value.reason == "no_common_scheme"
    assert "offers Basic" in err.value.message


async def test_negotiate_falls_back_to_ntlm_when_kerberos_is_unavailable(
    ntlm_users: Path,
) -> None:
    def factory(mechanism: str, bindings: bytes | None) -> Any:
        if mechanism == "kerberos":
            raise KerberosUnavailable(WindowsAuthFailed("kdc_unreachable", "no KDC"))
        return ntlm_factory()(mechanism, bindings)

    server = NTLMServer(offer=("Negotiate", "NTLM"))
    r = await send(server, WindowsAuth("negotiate", factory))
    assert r.status_code == 200 and server.user == "CORP\\alice"

    # ...but not for "kerberos", which reports why.
    with pytest.raises(WindowsAuthFailed) as err:
        await send(NTLMServer(), WindowsAuth("kerberos", factory))
    assert err.value.reason == "kdc_unreachable"


async def test_a_rechallenged_connection_reauthenticates_small_bodies_only() -> None:
    seen: list[httpx.Request] = []
    state = ConnectionState(authenticated=True)
    r = await send(
        kerberos_server(seen), WindowsAuth("kerberos", kerberos_factory([]), state=state),
        method="POST", content=b"small",
    )  # fmt: skip
    assert r.status_code == 200 and state.rechallenged
    assert [("authorization" in q.headers, q.content) for q in seen] == [
        (False, b"small"),
        (True, b"small"),
    ]
    state = ConnectionState(authenticated=True)
    with pytest.raises(WindowsAuthFailed) as err:
        await send(
            kerberos_server([]), WindowsAuth("kerberos", kerberos_factory([]), state=state),
            method="POST", content=stream_body([b"big"], []),
        )  # fmt: skip
    assert err.value.reason == "reauthentication_required"


# -- error mapping ----------------------------------------------------------------------------


class Krb5Error(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.err_code = code
        self.message = message


class GSSError(Exception):
    def __init__(self, minor: int, text: str) -> None:
        super().__init__(text)
        self.min_code = minor


class SpnegoLike(Exception):
    def __init__(self, base: Exception) -> None:
        super().__init__(f"SpnegoError: {base}")
        self.base_error = base


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (Krb5Error(-1765328360, "Preauthentication failed"), "wrong_password"),
        (Krb5Error(-1765328353, "Decrypt integrity check failed"), "wrong_password"),
        (Krb5Error(-1765328378, "Client not found in Kerberos database"), "unknown_user"),
        (Krb5Error(-1765328347, "Clock skew too great"), "clock_skew"),
        (Krb5Error(-1765328228, "Cannot contact any KDC for realm 'X'"), "kdc_unreachable"),
        (Krb5Error(-1765328366, "Client's credentials have been revoked"), "account_unusable"),
        (SpnegoLike(GSSError(2529638919, "Server HTTP/x@R not found")), "spn_not_found"),
        (SpnegoLike(GSSError(2529638949, "Clock skew too great")), "clock_skew"),
        (ValueError("Clock skew too great (Heimdal)"), "clock_skew"),
        (ValueError("No Kerberos credentials available"), "service_identity_unavailable"),
        (ValueError("something else entirely"), "kerberos_error"),
    ],
)
def test_errors_map_to_specific_reasons(exc: Exception, reason: str) -> None:
    failure = explain(exc, principal="alice@CORP.TEST", spn="HTTP/api.corp.test")
    assert failure.reason == reason
    assert failure.message.startswith(f"[{reason}] ")


def test_sspi_status_codes_map_too() -> None:
    exc = ValueError("SEC_E_TIME_SKEW")
    exc.winerror = 0x80090324  # type: ignore[attr-defined]
    assert explain(exc, principal="a", spn="HTTP/b").reason == "clock_skew"


# -- the pool: lanes per credential -----------------------------------------------------------


class CountingServers:
    """One NTLMServer per lane (a lane is one connection); records which lane served what."""

    def __init__(self) -> None:
        self.servers: list[NTLMServer] = []

    def __call__(self) -> httpx.AsyncBaseTransport:
        server = NTLMServer()
        self.servers.append(server)
        return httpx.MockTransport(server)


def head_auth(scheme: str = "ntlm") -> AuthSpec:
    return AuthSpec(type="windows", windows_scheme=scheme)  # type: ignore[arg-type]


async def pool_get(pool: WindowsPool, creds: dict[str, str], content: Any = None) -> httpx.Response:
    response, release = await pool.send(
        head_auth(), creds, "cxn_1", "POST" if content else "GET", "http://api.corp.test/x", [],
        content, httpx.Timeout(5),
    )  # fmt: skip
    await response.aread()
    await response.aclose()
    await release()
    return response


async def test_a_connection_authenticated_for_one_credential_never_serves_another(
    ntlm_users: Path,
) -> None:
    lanes = CountingServers()
    pool = WindowsPool(False, transport_factory=lanes)
    alice = {"username": USER, "password": PASSWORD}
    try:
        assert (await pool_get(pool, alice)).status_code == 200
        assert (await pool_get(pool, alice)).status_code == 200
        # Same credential: same lane, and the second request needed no handshake.
        assert len(lanes.servers) == 1
        assert ["authorization" in q.headers for q in lanes.servers[0].seen] == [True, True, False]
        # Another password for the same user is another credential: a new lane, and since it
        # is wrong, the server refuses it; the authenticated connection was never offered.
        with pytest.raises(WindowsAuthFailed):
            await pool_get(pool, {"username": USER, "password": "other"})
        assert len(lanes.servers) == 2
        assert len(lanes.servers[0].seen) == 3
    finally:
        await pool.aclose()


async def test_pool_checks_credentials_without_echoing_them() -> None:
    pool = WindowsPool(False, transport_factory=CountingServers())
    try:
        with pytest.raises(CredentialsInvalid, match="'password' is missing"):
            await pool_get(pool, {"username": USER})
        with pytest.raises(CredentialsInvalid, match="identity"):
            await pool_get(pool, {"identity": "someone", "password": "p"})
    finally:
        await pool.aclose()


async def test_small_bodies_are_kept_and_large_ones_stream() -> None:
    async def body(sizes: list[int], pulled: list[int]) -> AsyncIterator[bytes]:
        for size in sizes:
            pulled.append(size)
            yield b"x" * size

    pulled: list[int] = []
    small = await _buffer_small(body([1000, 2000], pulled))
    assert small == b"x" * 3000
    pulled = []
    big = await _buffer_small(body([REPLAYABLE_BODY_BYTES, 10, 20, 30], pulled))
    assert pulled == [REPLAYABLE_BODY_BYTES, 10]  # read one chunk past the limit, no further
    assert not isinstance(big, bytes)
    assert sum([len(c) async for c in big]) == REPLAYABLE_BODY_BYTES + 60  # type: ignore[union-attr]


async def test_passwords_never_reach_the_logs_even_at_debug(
    ntlm_users: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = io.StringIO()
    configure("json", "debug", stream=stream)
    for name in ("httpx", "httpcore", "spnego", "agent", "backhaul"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    pool = WindowsPool(False, transport_factory=CountingServers())
    try:
        await pool_get(pool, {"username": USER, "password": PASSWORD})
        with pytest.raises(WindowsAuthFailed) as err:
            await pool_get(pool, {"username": USER, "password": PASSWORD + "-wrong"})
        structlog.get_logger("test").warning("failed", error=str(err.value))
    finally:
        await pool.aclose()
        configure("console", "info")
    text = stream.getvalue() + capsys.readouterr().err
    assert "CORP" in text  # the logs did see the request
    assert PASSWORD not in text
    assert PASSWORD not in repr(WindowsCredential(USER, PASSWORD))


def test_credential_keys_hide_the_password_and_change_with_it() -> None:
    one = credential_key("lane", "ntlm", USER, PASSWORD)
    assert PASSWORD not in one and len(one) == 64
    assert one != credential_key("lane", "ntlm", USER, PASSWORD + "x")
    assert one == credential_key("lane", "ntlm", USER, PASSWORD)


@pytest.mark.parametrize(
    ("username", "principal"),
    [
        ("alice@corp.example.com", "alice@CORP.EXAMPLE.COM"),
        ("CORP\\alice", "alice"),
        ("corp.example.com\\alice", "alice@CORP.EXAMPLE.COM"),
        ("alice", "alice"),
    ],
)
def test_kerberos_principal_from_the_user_name(username: str, principal: str) -> None:
    assert WindowsCredential(username, "p").kerberos_principal() == principal


def test_kerberos_settings_become_the_mit_variables(tmp_path: Path) -> None:
    from agent.config import KerberosConfig

    env: dict[str, str] = {}
    cfg = KerberosConfig(krb5_config=tmp_path / "krb5.conf", client_keytab=tmp_path / "a.keytab")
    assert apply_environment(cfg, env) == {
        "KRB5_CONFIG": str(tmp_path / "krb5.conf"),
        "KRB5_CLIENT_KTNAME": str(tmp_path / "a.keytab"),
        "KRB5CCNAME": "MEMORY:backhaul-agent",
    }
    env = {"KRB5CCNAME": "FILE:/tmp/mine"}
    apply_environment(cfg, env)
    assert env["KRB5CCNAME"] == "FILE:/tmp/mine"  # an operator's own cache is kept
    assert apply_environment(KerberosConfig(), {}) == {}


# -- the request head ---------------------------------------------------------------------


def head(auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": "GET",
        "url": "http://api.corp.test/x",
        "headers": [],
        "connection_id": "cxn_1",
        "base_url": "http://api.corp.test/",
        "auth": auth,
        "suite": "s",
        "sealed": "",
        "timeout_ms": 1000,
    }


def test_head_carries_the_windows_scheme_and_spn() -> None:
    parsed = RequestHead.parse(head({"type": "windows", "windows_scheme": "ntlm", "spn": "HTTP/x"}))
    assert (parsed.auth.windows_scheme, parsed.auth.spn) == ("ntlm", "HTTP/x")
    assert RequestHead.parse(head({"type": "windows"})).auth.windows_scheme == "negotiate"


@pytest.mark.parametrize(
    "auth",
    [
        {"type": "basic", "windows_scheme": "ntlm"},
        {"type": "windows", "windows_scheme": "digest"},
        {"type": "windows", "spn": "HTTP/host with space"},
        {"type": "windows", "spn": "no-slash"},
    ],
)
def test_head_refuses_misplaced_or_bad_windows_fields(auth: dict[str, Any]) -> None:
    from agent.errors import BadRequestHead

    with pytest.raises(BadRequestHead):
        RequestHead.parse(head(auth))
