"""The member's gateway keys, one per key version.

A rotation gives the gateway a new key pair while connections are still sealed to the old
one, so a member holds several generations for a while and opens each request with the
version its head names. On disk, next to ``gateway_key_file`` (``keys/gateway.key``)::

    keys/gateway.key       the newest key (what a single-key agent reads; version 1 if alone)
    keys/gateway.1.key     every version held, by number
    keys/gateway.2.key

All written 0600 and refused when group or others can read them (:mod:`backhaul.keys`).
A new version is written to its own file first and then to ``gateway.key``, so a crash in
between leaves a keyring that still loads. Old versions are deleted when the relay says the
rotation is over (after a grace period for requests already in flight); the newest version
is never deleted.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from agent.errors import KeyVersionUnavailable
from backhaul.errors import KeyFileError, SealError
from backhaul.keys import b64d, b64e, read_private, write_private
from backhaul.seal import GatewayKeyPair

__all__ = ["Keyring", "decode_key", "encode_key"]


def encode_key(key: GatewayKeyPair) -> bytes:
    return (b64e(key.to_bytes()) + "\n").encode("ascii")


def decode_key(raw: bytes, path: Path) -> GatewayKeyPair:
    try:
        return GatewayKeyPair.from_bytes(b64d(raw.decode("ascii").strip()))
    except (SealError, ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} is not a gateway key") from exc


class Keyring:
    """Versioned gateway keys; ``path`` is ``gateway.key`` (None: in memory only)."""

    def __init__(self, path: Path | None, keys: dict[int, GatewayKeyPair]) -> None:
        if not keys:
            raise KeyFileError("a keyring needs at least one key")
        self.path = path
        self._keys = dict(keys)

    # -- loading and creating

    @classmethod
    def in_memory(cls, key: GatewayKeyPair, version: int = 1) -> Keyring:
        return cls(None, {version: key})

    @classmethod
    def create(cls, path: Path, key: GatewayKeyPair, version: int) -> Keyring:
        """Write a fresh keyring holding one key (enrollment)."""
        keyring = cls(path, {version: key})
        keyring._write(version, key)
        return keyring

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Read ``gateway.key`` and every ``gateway.<version>.key`` beside it."""
        pattern = re.compile(rf"{re.escape(path.stem)}\.(\d{{1,9}}){re.escape(path.suffix)}\Z")
        keys: dict[int, GatewayKeyPair] = {}
        if path.parent.is_dir():
            for candidate in sorted(path.parent.iterdir()):
                match = pattern.match(candidate.name)
                if match:
                    keys[int(match.group(1))] = decode_key(read_private(candidate), candidate)
        if not path.exists() and keys:
            return cls(path, keys)
        newest = decode_key(read_private(path), path)
        if not any(k.to_bytes() == newest.to_bytes() for k in keys.values()):
            if 1 in keys:
                raise KeyFileError(
                    f"key file {path} matches none of the versioned keys beside it; "
                    "restore it from a backup or re-enroll this member"
                )
            keys[1] = newest  # an agent enrolled before keys were versioned
        return cls(path, keys)

    # -- reading

    @property
    def versions(self) -> list[int]:
        return sorted(self._keys)

    @property
    def current_version(self) -> int:
        return max(self._keys)

    @property
    def current(self) -> GatewayKeyPair:
        return self._keys[self.current_version]

    def has(self, version: int) -> bool:
        return version in self._keys

    def get(self, version: int) -> GatewayKeyPair:
        key = self._keys.get(version)
        if key is None:
            raise KeyVersionUnavailable(version, self.versions)
        return key

    # -- changing

    def add(self, version: int, key: GatewayKeyPair) -> bool:
        """Store a new version; False when it was already held (the same key)."""
        held = self._keys.get(version)
        if held is not None:
            if held.to_bytes() != key.to_bytes():
                raise KeyFileError(f"gateway key version {version} is already held, differently")
            return False
        self._write(version, key)
        self._keys[version] = key
        return True

    def retire(self, keep_from: int) -> list[int]:
        """Forget every version below ``keep_from`` except the newest; returns those removed."""
        newest = self.current_version
        gone = [v for v in self.versions if v < keep_from and v != newest]
        for version in gone:
            del self._keys[version]
            if self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.version_path(version).unlink()
        return gone

    def version_path(self, version: int) -> Path:
        assert self.path is not None
        return self.path.with_name(f"{self.path.stem}.{version}{self.path.suffix}")

    def _write(self, version: int, key: GatewayKeyPair) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for held, held_key in self._keys.items():
            if not self.version_path(held).exists():  # an agent from before versioned files
                write_private(self.version_path(held), encode_key(held_key))
        write_private(self.version_path(version), encode_key(key))
        if not self._keys or version >= max(self._keys):
            write_private(self.path, encode_key(key))
