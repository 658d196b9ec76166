"""Key files: Ed25519 member keys and the gateway's HPKE key pair.

Private keys are written mode 0600 and refused at load time when group or others can read
them, the way OpenSSH refuses an unprotected identity file.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from backhaul.errors import KeyFileError

PRIVATE_MODE = 0o600


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("invalid base64") from exc


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file atomically with mode 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, PRIVATE_MODE)
    os.replace(tmp, path)


def read_private(path: Path) -> bytes:
    """Read a secret file, refusing one that group or others may read."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file not found: {path}") from exc
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    return path.read_bytes()


def generate_signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def signing_key_bytes(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    raw = read_private(path)
    try:
        return ed25519.Ed25519PrivateKey.from_private_bytes(b64d(raw.decode("ascii").strip()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} is not an Ed25519 private key") from exc


def save_signing_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    write_private(path, (b64e(key.private_bytes_raw()) + "\n").encode("ascii"))


def public_key_text(key: ed25519.Ed25519PrivateKey) -> str:
    return b64e(key.public_key().public_bytes_raw())


def verify_signature(public_key_b64: str, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message``."""
    try:
        pub = ed25519.Ed25519PublicKey.from_public_bytes(b64d(public_key_b64))
        pub.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def fingerprint(der: bytes) -> str:
    """SHA-256 fingerprint of a DER certificate, as 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(der).hexdigest()
