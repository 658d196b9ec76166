"""An HTTPS server that requires NTLM with channel bindings (Extended Protection "Required").

Debian's mod_auth_gssapi cannot require channel bindings, so this stands in for an IIS site
with Extended Protection set to Required: pyspnego's NTLM acceptor is given the
``tls-server-end-point`` bindings of this server's own certificate (RFC 5929 §4.1), and an
AUTHENTICATE message whose MsvAvChannelBindings is missing, all zeros (a client that does not
know the bindings) or different is refused with 401. NTLM authenticates the connection, so the
context lives with the connection; once authenticated, later requests on it are served
without a token (MS-NTHT §2).

    NTLM_USER_FILE=users python tests/real/cbserver.py --port P --cert C --key K

``GET``/``POST`` of any path answers ``{"user", "channel_bindings": "verified", "bytes"}``.
Every decision is printed on stdout (the log the tests read): ``ACCEPT``, ``REJECT <why>``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import spnego
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spnego.channel_bindings import GssChannelBindings
from spnego.exceptions import SpnegoError

_ZERO_BINDINGS = b"\x00" * 16


def bindings_for(cert_pem: bytes) -> GssChannelBindings:
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    algorithm = cert.signature_hash_algorithm
    name = "sha256" if algorithm is None or algorithm.name in ("md5", "sha1") else algorithm.name
    data = b"tls-server-end-point:" + hashlib.new(name, der).digest()
    return GssChannelBindings(application_data=data)


def client_bindings_hash(authenticate: bytes) -> bytes | None:
    """The MsvAvChannelBindings value of an NTLMv2 AUTHENTICATE message (MS-NLMP §2.2.2.1)."""
    from spnego._ntlm_raw.messages import (
        Authenticate,
        AvId,
        NTClientChallengeV2,
    )

    message = Authenticate.unpack(authenticate)
    response = message.nt_challenge_response or b""
    if len(response) <= 24:
        return None  # NTLMv1 has no AV pairs, so no bindings
    pairs = NTClientChallengeV2.unpack(response[16:]).av_pairs
    value = pairs.get(AvId.channel_bindings)
    return None if value is None else bytes(value)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bindings: GssChannelBindings

    def setup(self) -> None:
        super().setup()
        self.context: Any = None
        self.user: str | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _say(self, line: str) -> None:
        print(line, flush=True)

    def _drain(self) -> int:
        length = int(self.headers.get("content-length") or 0)
        left = length
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        return length

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _challenge(self, why: str, token: bytes | None = None, scheme: str = "NTLM") -> None:
        value = scheme if token is None else f"{scheme} {base64.b64encode(token).decode()}"
        if token is None:
            self.context = None
        self._answer(401, {"error": why}, {"WWW-Authenticate": value})

    def _handle(self) -> None:
        size = self._drain()
        if self.user is not None:
            self._answer(200, self._ok(size), {})
            return
        header = self.headers.get("authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() not in ("ntlm", "negotiate") or not value:
            self._challenge("authentication required")
            return
        token = base64.b64decode(value)
        if token[8:12] == b"\x01\x00\x00\x00":
            self.context = spnego.server(
                protocol="ntlm",
                options=spnego.NegotiateOptions.use_ntlm,
                channel_bindings=self.bindings,
            )
            self._challenge("challenge", self.context.step(token), scheme)
            return
        if self.context is None:
            self._say("REJECT authenticate-without-negotiate")
            self._challenge("AUTHENTICATE without NEGOTIATE on this connection")
            return
        sent = client_bindings_hash(token)
        if sent is None or sent == _ZERO_BINDINGS:
            self._say("REJECT missing-bindings")
            self._challenge("channel bindings are required (Extended Protection)")
            return
        try:
            self.context.step(token)
        except SpnegoError as exc:
            kind = "wrong-bindings" if "binding" in str(exc).lower() else "bad-credentials"
            self._say(f"REJECT {kind}")
            self._challenge(kind)
            return
        self.user = str(self.context.client_principal)
        self._say(f"ACCEPT {self.user}")
        self._answer(200, self._ok(size), {})

    def _ok(self, size: int) -> dict[str, Any]:
        return {"user": self.user, "channel_bindings": "verified", "bytes": size}

    do_GET = _handle
    do_POST = _handle
    do_PUT = _handle


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    with open(args.cert, "rb") as fh:
        Handler.bindings = bindings_for(fh.read())
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"listening on https://127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
