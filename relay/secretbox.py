"""Encryption at rest for what the relay itself must read back.

Gateway credentials are sealed to the gateway and never readable here; but an *online*
connector is called by the relay, so the relay must be able to read its OAuth tokens, its
API key or its password. Those are encrypted with AES-256-GCM under a key derived (HKDF-SHA256,
RFC 5869) from the relay's ``secret_key``, which comes from relay.toml or
``BACKHAUL_RELAY_SECRET_KEY`` and is never written to the database: a copy of the database
alone yields no token.

Every blob is bound (GCM associated data) to its purpose and to the row it belongs to, so a
token blob copied to another connection, or an OAuth state copied into a token row, does not
decrypt. Layout: ``version (1) | key id (4) | nonce (12) | ciphertext+tag``. The key id is
the first bytes of a hash of the derived key, so a relay started with another ``secret_key``
says so instead of reporting a corrupt blob.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay import RelayError
from relay.config import RelayConfig

VERSION = 1
SUITE = "relay-key/AES-256-GCM"
_INFO = b"backhaul relay secretbox v1"


class SecretBoxError(RelayError):
    """No key configured, or a blob that does not open with this relay's key."""


class SecretBox:
    """Encrypt and decrypt small JSON documents bound to ``(purpose, row id)``."""

    def __init__(self, secret_key: str) -> None:
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
            secret_key.encode("utf-8")
        )
        self._aead = AESGCM(self._key)
        self.key_id = hashlib.sha256(b"key-id" + self._key).digest()[:4]

    @staticmethod
    def _aad(purpose: str, row_id: str) -> bytes:
        return f"{purpose}\x00{row_id}".encode()

    def seal(self, purpose: str, row_id: str, document: Any) -> bytes:
        nonce = os.urandom(12)
        plain = json.dumps(document, separators=(",", ":")).encode()
        body = self._aead.encrypt(nonce, plain, self._aad(purpose, row_id))
        return bytes([VERSION]) + self.key_id + nonce + body

    def open(self, purpose: str, row_id: str, blob: bytes) -> Any:
        if len(blob) < 1 + 4 + 12 + 16 or blob[0] != VERSION:
            raise SecretBoxError(f"{purpose} of {row_id}: not a relay-encrypted blob")
        if blob[1:5] != self.key_id:
            raise SecretBoxError(
                f"{purpose} of {row_id} was encrypted with another secret_key; "
                "restore the previous key or sign in again"
            )
        try:
            plain = self._aead.decrypt(blob[5:17], blob[17:], self._aad(purpose, row_id))
        except InvalidTag:
            raise SecretBoxError(
                f"{purpose} of {row_id} does not open (moved or tampered)"
            ) from None
        return json.loads(plain)


def box_for(config: RelayConfig) -> SecretBox:
    """The relay's box; a clear error when ``secret_key`` is not configured."""
    if config.secret_key is None:
        raise SecretBoxError(
            "the relay has no secret_key (relay.toml or BACKHAUL_RELAY_SECRET_KEY); online "
            "connectors with credentials and OAuth 2.0 need it"
        )
    return SecretBox(config.secret_key.get_secret_value())
