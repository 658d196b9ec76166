"""Gateway key rotation, the cryptographic part: hand the successor key to every member,
and re-seal a connection's credentials from one key generation to the next.

Handover
--------
The admin's CLI (which unwrapped the current private key with the recovery key) generates
the successor key pair and seals its private key, with HPKE, to the *current* gateway public
key: every member holds the current private key, so every member can open it, and the relay,
which holds no private key, cannot.

HPKE base mode (RFC 9180 §5.1.1) does not authenticate the sender: anyone who knows the
public key -- the relay included -- could seal a key pair of its own choosing and then ask
the members to re-seal every credential to it. So the handover also carries a proof that its
author holds the current private key: an HMAC-SHA256 over the gateway id, both versions and
the successor's public key, keyed with HKDF-SHA256 of the current private key. A member
checks it before it stores the key, and re-seals only to keys it stored this way.

``info`` binds the gateway id and both versions, so a handover cannot be replayed for
another gateway or another step.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from backhaul.errors import SealError
from backhaul.keys import b64d, b64e
from backhaul.recovery import RecoveryKey, unwrap, wrap
from backhaul.seal import GatewayKeyPair, open_from, open_sealed, seal, seal_to

__all__ = ["open_successor", "reseal", "rotation_request", "seal_successor"]

_PROOF_KEY_INFO = b"backhaul gateway key handover proof v1"


def _info(gateway_id: str, from_version: int, to_version: int) -> bytes:
    return f"backhaul.v1 gateway key\x00{gateway_id}\x00{from_version}\x00{to_version}".encode()


def _proof(
    current: GatewayKeyPair, gateway_id: str, from_version: int, to_version: int, public: str
) -> bytes:
    key = HKDF(hashes.SHA256(), 32, salt=None, info=_PROOF_KEY_INFO).derive(current.to_bytes())
    message = _info(gateway_id, from_version, to_version) + b"\x00" + public.encode("ascii")
    return hmac.new(key, message, hashlib.sha256).digest()


def seal_successor(
    current: GatewayKeyPair,
    successor: GatewayKeyPair,
    gateway_id: str,
    from_version: int,
    to_version: int,
) -> str:
    """The handover blob (base64url) for ``successor``, openable by holders of ``current``."""
    if to_version <= from_version:
        raise ValueError("the successor's version must be higher")
    public = successor.public_text()
    doc = {
        "private_key": b64e(successor.to_bytes()),
        "proof": b64e(_proof(current, gateway_id, from_version, to_version, public)),
    }
    blob = seal_to(
        current.public_text(),
        _info(gateway_id, from_version, to_version),
        json.dumps(doc, separators=(",", ":")).encode(),
    )
    return b64e(blob)


def open_successor(
    current: GatewayKeyPair,
    handover: str,
    gateway_id: str,
    from_version: int,
    to_version: int,
    public_key: str | None = None,
) -> GatewayKeyPair:
    """Open and verify a handover; raise SealError unless it came from a holder of ``current``
    (and, when given, carries the key whose public half is ``public_key``)."""
    if to_version <= from_version:
        raise SealError("the new key version must be higher than the current one")
    try:
        blob = b64d(handover)
    except ValueError as exc:
        raise SealError("key handover is not base64") from exc
    plaintext = open_from(current, _info(gateway_id, from_version, to_version), blob)
    try:
        doc: Any = json.loads(plaintext)
        successor = GatewayKeyPair.from_bytes(b64d(doc["private_key"]))
        proof = b64d(doc["proof"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SealError("key handover is malformed") from exc
    public = successor.public_text()
    expected = _proof(current, gateway_id, from_version, to_version, public)
    if not hmac.compare_digest(proof, expected):
        raise SealError("key handover was not made by a holder of the current gateway key")
    if public_key is not None and public_key != public:
        raise SealError("key handover carries another key than the one announced")
    return successor


def reseal(
    old: GatewayKeyPair,
    new: GatewayKeyPair,
    suite: str,
    blob: bytes,
    connection_id: str,
    base_url: str,
) -> tuple[str, bytes]:
    """Open credentials sealed to ``old`` and seal them to ``new``, same binding.

    The binding (connection id, base URL) is checked by the open and reused by the seal, so a
    relay cannot use a re-seal to move credentials to another connection or API.
    """
    credentials = open_sealed(old, suite, blob, connection_id, base_url)
    try:
        return seal(new.public_text(), connection_id, base_url, credentials)
    finally:
        del credentials


def rotation_request(key_doc: dict[str, Any], secret: RecoveryKey) -> dict[str, Any]:
    """What the admin's CLI uploads to rotate a gateway key.

    ``key_doc`` is ``GET /v1/gateways/{id}/key``. The current private key is unwrapped here,
    on the admin's machine, with the recovery key; the successor is generated here, wrapped
    under the same recovery key (bound to the next version) and sealed to the current public
    key for the members. Raises RecoveryKeyError (wrong key) or SealError.
    """
    gateway_id = str(key_doc["gateway_id"])
    version = int(key_doc["key_version"])
    public = key_doc.get("hpke_public_key")
    wrapped = key_doc.get("wrapped_private_key")
    if not public:
        raise SealError(f"gateway {gateway_id} has no key yet: enroll a member first")
    if not wrapped:
        raise SealError(
            f"the relay holds no recovery-wrapped key for gateway {gateway_id} (its first member "
            "was enrolled without one), so its key cannot be rotated"
        )
    current = GatewayKeyPair.from_bytes(unwrap(secret, wrapped, gateway_id, version))
    if current.public_text() != public:
        raise SealError("the relay's wrapped key does not match the gateway's public key")
    successor = GatewayKeyPair.generate()
    return {
        "hpke_public_key": successor.public_text(),
        "wrapped_private_key": wrap(secret, successor.to_bytes(), gateway_id, version + 1),
        "transport": seal_successor(current, successor, gateway_id, version, version + 1),
        "key_version": version + 1,
    }
