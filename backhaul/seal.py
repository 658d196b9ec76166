"""Sealing connection credentials to a gateway with HPKE (RFC 9180).

The relay seals credentials to the gateway's public key the moment they arrive and keeps only
the blob; only an agent holding the gateway's private key can open it. The KEM is the hybrid
post-quantum ML-KEM-768 + X25519, so a blob recorded today stays safe against a future
quantum computer (draft-ietf-hpke-pq). The suite name is stored beside each blob so it can
change later without re-reading old data blindly.

Binding (RFC 9180 §5.1, ``info``): the connection id and the connector's base URL go into
``info``, so a blob moved to another connection, or replayed by a relay towards another
API, does not open. The plaintext also repeats the base URL so the agent can check that the
request it is asked to make stays under it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from backhaul.errors import SealError
from backhaul.keys import b64d, b64e

SUITE_NAME = "MLKEM768_X25519/HKDF_SHA256/CHACHA20_POLY1305"
_SUITES = {
    SUITE_NAME: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305
    )
}
_MLKEM_SEED = 64
_X25519 = 32
_MLKEM_PUB = 1184


@dataclass(frozen=True)
class GatewayKeyPair:
    """The gateway's HPKE private key, kept as its seeds so it serializes to 96 bytes."""

    mlkem_seed: bytes
    x25519_private: bytes

    @classmethod
    def generate(cls) -> GatewayKeyPair:
        mk = mlkem.MLKEM768PrivateKey.generate()
        xk = x25519.X25519PrivateKey.generate()
        return cls(mk.private_bytes_raw(), xk.private_bytes_raw())

    def to_bytes(self) -> bytes:
        return self.mlkem_seed + self.x25519_private

    @classmethod
    def from_bytes(cls, raw: bytes) -> GatewayKeyPair:
        if len(raw) != _MLKEM_SEED + _X25519:
            raise SealError("gateway private key has the wrong length")
        return cls(raw[:_MLKEM_SEED], raw[_MLKEM_SEED:])

    @functools.cached_property
    def _private(self) -> hpke.MLKEM768X25519PrivateKey:
        # Expanding the ML-KEM seed costs more than a whole HPKE open: do it once per key.
        return hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem_seed),
            x25519.X25519PrivateKey.from_private_bytes(self.x25519_private),
        )

    def public_text(self) -> str:
        """The public key as base64url text (ML-KEM-768 public key then X25519 public key)."""
        mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem_seed).public_key()
        xk = x25519.X25519PrivateKey.from_private_bytes(self.x25519_private).public_key()
        return b64e(mk.public_bytes_raw() + xk.public_bytes_raw())


def _public_from_text(text: str) -> hpke.MLKEM768X25519PublicKey:
    try:
        raw = b64d(text)
    except ValueError as exc:
        raise SealError("gateway public key is not base64") from exc
    if len(raw) != _MLKEM_PUB + _X25519:
        raise SealError("gateway public key has the wrong length")
    try:
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM_PUB]),
            x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM_PUB:]),
        )
    except ValueError as exc:
        raise SealError("gateway public key is invalid") from exc


def validate_public_key(text: str) -> None:
    """Raise SealError unless ``text`` is a usable gateway public key."""
    _public_from_text(text)


def _info(connection_id: str, base_url: str) -> bytes:
    return f"backhaul.v1 credentials\x00{connection_id}\x00{base_url}".encode()


def seal(
    public_key_text: str, connection_id: str, base_url: str, credentials: dict[str, Any]
) -> tuple[str, bytes]:
    """Seal ``credentials`` for one connection. Returns (suite name, blob)."""
    plaintext = json.dumps(
        {"base_url": base_url, "credentials": credentials}, separators=(",", ":")
    ).encode()
    suite = _SUITES[SUITE_NAME]
    blob = suite.encrypt(
        plaintext, _public_from_text(public_key_text), info=_info(connection_id, base_url)
    )
    return SUITE_NAME, blob


def open_sealed(
    key: GatewayKeyPair, suite_name: str, blob: bytes, connection_id: str, base_url: str
) -> dict[str, Any]:
    """Open a blob sealed by :func:`seal`; raise SealError on any mismatch."""
    suite = _SUITES.get(suite_name)
    if suite is None:
        raise SealError(f"unsupported seal suite {suite_name!r}")
    try:
        plaintext = suite.decrypt(blob, key._private, info=_info(connection_id, base_url))
    except (InvalidTag, ValueError) as exc:
        raise SealError("sealed credentials do not open for this connection") from exc
    try:
        doc = json.loads(plaintext)
    except ValueError as exc:
        raise SealError("sealed credentials are not valid JSON") from exc
    if not isinstance(doc, dict) or doc.get("base_url") != base_url:
        raise SealError("sealed credentials are bound to another API")
    creds = doc.get("credentials")
    if not isinstance(creds, dict):
        raise SealError("sealed credentials are malformed")
    return creds


def seal_to(public_key_text: str, info: bytes, plaintext: bytes) -> bytes:
    """HPKE-seal arbitrary bytes to a gateway public key (the key handover in a rotation)."""
    return _SUITES[SUITE_NAME].encrypt(plaintext, _public_from_text(public_key_text), info=info)


def open_from(key: GatewayKeyPair, info: bytes, blob: bytes) -> bytes:
    """Open a blob made by :func:`seal_to`; raise SealError when it does not open."""
    try:
        return _SUITES[SUITE_NAME].decrypt(blob, key._private, info=info)
    except (InvalidTag, ValueError) as exc:
        raise SealError("sealed blob does not open with this key") from exc
