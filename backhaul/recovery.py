"""The admin's recovery key, and the gateway private key wrapped under it.

The first member of a gateway creates the cluster's HPKE key pair. So that more members can
join later (and the key can be rotated) without copying key files between machines, the
private key is also stored on the relay, *wrapped*: encrypted under a key derived from the
admin's recovery key. The relay never sees the recovery key, so it cannot unwrap it.

Recovery key format
-------------------
``bhrk_`` followed by 56 characters of Crockford base32 (RFC 4648's alphabet is easy to
misread; Crockford's drops I, L, O and U and reads ``O`` as ``0`` and ``I``/``L`` as ``1``),
in 14 groups of 4 separated by ``-``::

    bhrk_7K3M-QX9D-1V4T-...-H2PA

The 35 bytes behind them are 32 random bytes (the secret) and a 3-byte checksum
(SHA-256 of a label and the secret). Case, spaces and dashes do not matter. A typo is caught
by the checksum *before* any key derivation runs, so the operator hears "typo" at once
instead of "wrong key" after a pause. The ``bhrk_`` prefix lets log redaction and secret
scanners recognise the key. An admin who keeps secrets in a password manager may use a
passphrase of at least 16 characters instead; it is derived with stronger parameters.

Key derivation (scrypt, RFC 7914)
---------------------------------
scrypt rather than PBKDF2 because it is memory-hard (GPU and ASIC guessing is expensive),
and rather than Argon2 because ``cryptography`` ships scrypt everywhere the agent runs
(Argon2id needs OpenSSL 3.2). Parameters, recorded in every blob so they can be raised later:

* generated keys: ``n = 2**15, r = 8, p = 1`` (32 MiB, about 70-100 ms). The secret has 256
  bits of entropy, so guessing it is hopeless whatever the cost; scrypt here adds domain
  separation and costs the enrolling admin a blink.
* passphrases: ``n = 2**17, r = 8, p = 1`` (128 MiB, about 0.3 s): the minimum OWASP gives
  for scrypt, because a human-chosen secret *can* be guessed offline by whoever holds the blob
  (the relay's operator, an enrollment token's holder).

Unwrapping refuses parameters above 256 MiB of memory, so a hostile relay cannot make an
agent allocate gigabytes.

Wrapping
--------
ChaCha20-Poly1305 (RFC 8439) with a random 96-bit nonce under the derived 32-byte key; the
associated data binds the gateway id and the key version, so a blob cannot be replayed for
another gateway or passed off as another generation of the key. The blob is JSON::

    {"v": 1, "kdf": "scrypt", "n": 32768, "r": 8, "p": 1,
     "salt": b64url(16), "nonce": b64url(12), "ct": b64url(96 + 16)}

A wrong recovery key (or a tampered blob) fails the AEAD tag: ``RecoveryKeyError("wrong
recovery key")``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from backhaul.errors import BackhaulError
from backhaul.keys import b64d, b64e

__all__ = [
    "KEY_PARAMS",
    "PASSPHRASE_MIN",
    "PASSPHRASE_PARAMS",
    "PREFIX",
    "RecoveryKey",
    "RecoveryKeyError",
    "check_blob",
    "format_key",
    "generate",
    "parse",
    "unwrap",
    "wrap",
]

PREFIX = "bhrk_"
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)} | {"O": 0, "I": 1, "L": 1}
_SECRET_BYTES = 32
_CHECK_BYTES = 3
_CHARS = (_SECRET_BYTES + _CHECK_BYTES) * 8 // 5  # 56
_GROUP = 4
_CHECK_LABEL = b"backhaul recovery key v1\x00"
_AAD_LABEL = b"backhaul gateway key wrap v1\x00"

PASSPHRASE_MIN = 16
#: scrypt parameters (n, r, p) for generated keys and for passphrases; see the module doc.
KEY_PARAMS = (2**15, 8, 1)
PASSPHRASE_PARAMS = (2**17, 8, 1)
_MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
_MAX_BLOB = 4096


class RecoveryKeyError(BackhaulError):
    """A recovery key is malformed, or does not unwrap the gateway key."""


@dataclass(frozen=True, repr=False)
class RecoveryKey:
    """A parsed recovery key. ``secret`` is what scrypt derives from; never log it."""

    secret: bytes
    kind: Literal["key", "passphrase"]

    def __repr__(self) -> str:
        return f"RecoveryKey(kind={self.kind!r}, secret=[redacted])"

    @property
    def params(self) -> tuple[int, int, int]:
        return KEY_PARAMS if self.kind == "key" else PASSPHRASE_PARAMS


def _checksum(secret: bytes) -> bytes:
    return hashlib.sha256(_CHECK_LABEL + secret).digest()[:_CHECK_BYTES]


def _encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    chars = [_ALPHABET[(number >> (5 * i)) & 31] for i in range(_CHARS)]
    return "".join(reversed(chars))


def format_key(secret: bytes) -> str:
    """The printable form of a 32-byte secret: prefix, 14 groups of 4, checksum included."""
    if len(secret) != _SECRET_BYTES:
        raise ValueError("a recovery key secret is 32 bytes")
    body = _encode(secret + _checksum(secret))
    return PREFIX + "-".join(body[i : i + _GROUP] for i in range(0, _CHARS, _GROUP))


def generate() -> tuple[RecoveryKey, str]:
    """A fresh random recovery key and its printable text (show it once, store it nowhere)."""
    secret = secrets.token_bytes(_SECRET_BYTES)
    return RecoveryKey(secret, "key"), format_key(secret)


def _decode_key(body: str) -> bytes | None:
    """The 35 bytes behind 56 base32 characters, or None when a character is not base32."""
    number = 0
    for char in body:
        value = _DECODE.get(char)
        if value is None:
            return None
        number = (number << 5) | value
    return number.to_bytes(_SECRET_BYTES + _CHECK_BYTES, "big")


def parse(text: str) -> RecoveryKey:
    """Parse what the operator typed: a ``bhrk_`` key (checksum verified) or a passphrase.

    Raises RecoveryKeyError with a message that never contains the input.
    """
    stripped = unicodedata.normalize("NFKC", text).strip()
    if not stripped:
        raise RecoveryKeyError("the recovery key is empty")
    prefixed = stripped.lower().startswith(PREFIX) or stripped.lower().startswith("bhrk-")
    body = stripped[len(PREFIX) :] if prefixed else stripped
    body = "".join(body.split()).replace("-", "").upper()
    if prefixed or len(body) == _CHARS:
        raw = _decode_key(body) if len(body) == _CHARS else None
        if raw is None:
            if prefixed:
                raise RecoveryKeyError(
                    "not a valid recovery key: expected bhrk_ and 14 groups of 4 letters or "
                    "digits; check for a missing or extra character"
                )
        else:
            secret, check = raw[:_SECRET_BYTES], raw[_SECRET_BYTES:]
            if not secrets.compare_digest(check, _checksum(secret)):
                raise RecoveryKeyError(
                    "not a valid recovery key: the checksum does not match; check for a typo"
                )
            return RecoveryKey(secret, "key")
    if len(stripped) < PASSPHRASE_MIN:
        raise RecoveryKeyError(
            "not a valid recovery key: expected bhrk_ and 14 groups of 4 characters "
            f"(or a passphrase of at least {PASSPHRASE_MIN} characters)"
        )
    return RecoveryKey(stripped.encode("utf-8"), "passphrase")


def _aad(gateway_id: str, key_version: int) -> bytes:
    return _AAD_LABEL + gateway_id.encode("utf-8") + b"\x00" + str(key_version).encode("ascii")


def _derive(secret: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def wrap(
    recovery: RecoveryKey, private_key: bytes, gateway_id: str, key_version: int
) -> dict[str, Any]:
    """Encrypt ``private_key`` under ``recovery`` for one gateway and key version."""
    n, r, p = recovery.params
    salt = os.urandom(16)
    nonce = os.urandom(12)
    key = _derive(recovery.secret, salt, n, r, p)
    ct = ChaCha20Poly1305(key).encrypt(nonce, private_key, _aad(gateway_id, key_version))
    return {
        "v": 1,
        "kdf": "scrypt",
        "n": n,
        "r": r,
        "p": p,
        "salt": b64e(salt),
        "nonce": b64e(nonce),
        "ct": b64e(ct),
    }


def _int(doc: Mapping[str, Any], name: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RecoveryKeyError(f"wrapped key: {name} must be a positive integer")
    return value


def _bytes(doc: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    value = doc.get(name)
    try:
        raw = b64d(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or (size is not None and len(raw) != size):
        raise RecoveryKeyError(f"wrapped key: {name} is malformed")
    return raw


def check_blob(blob: Mapping[str, Any] | str) -> dict[str, Any]:
    """Validate a wrapped-key document's shape (no secret needed); return it as a dict.

    The relay runs this before storing one, the agent before running scrypt on one.
    """
    if isinstance(blob, str):
        if len(blob) > _MAX_BLOB:
            raise RecoveryKeyError("wrapped key: too large")
        try:
            blob = json.loads(blob)
        except ValueError:
            raise RecoveryKeyError("wrapped key: not valid JSON") from None
    if not isinstance(blob, Mapping):
        raise RecoveryKeyError("wrapped key: must be a JSON object")
    doc = dict(blob)
    if set(doc) != {"v", "kdf", "n", "r", "p", "salt", "nonce", "ct"}:
        raise RecoveryKeyError("wrapped key: unexpected or missing fields")
    if doc["v"] != 1 or doc["kdf"] != "scrypt":
        raise RecoveryKeyError("wrapped key: unsupported version or KDF")
    n, r, p = _int(doc, "n"), _int(doc, "r"), _int(doc, "p")
    if n < 2**14 or n & (n - 1) or 128 * r * n * p > _MAX_SCRYPT_MEMORY:
        raise RecoveryKeyError("wrapped key: scrypt parameters out of range")
    _bytes(doc, "salt")
    _bytes(doc, "nonce", 12)
    ct = _bytes(doc, "ct")
    if not 16 < len(ct) <= 1024:
        raise RecoveryKeyError("wrapped key: ciphertext has the wrong size")
    return doc


def unwrap(
    recovery: RecoveryKey, blob: Mapping[str, Any] | str, gateway_id: str, key_version: int
) -> bytes:
    """The private key bytes inside ``blob``; RecoveryKeyError("wrong recovery key") if the
    key (or the gateway id, or the version) does not match."""
    doc = check_blob(blob)
    key = _derive(recovery.secret, _bytes(doc, "salt"), doc["n"], doc["r"], doc["p"])
    try:
        return ChaCha20Poly1305(key).decrypt(
            _bytes(doc, "nonce", 12), _bytes(doc, "ct"), _aad(gateway_id, key_version)
        )
    except InvalidTag:
        raise RecoveryKeyError("wrong recovery key") from None
