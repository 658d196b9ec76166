"""Exceptions shared by every part of Backhaul.

::

    BackhaulError
    ├── ConfigError            a configuration key is missing or invalid (names the key)
    ├── KeyFileError           a key file is missing, malformed or readable by others
    ├── SealError              sealed credentials could not be opened (wrong key, wrong binding)
    └── ProtocolError          see backhaul.wire.errors (local and remote violations)
"""

from __future__ import annotations


class BackhaulError(Exception):
    """Root of every error Backhaul raises on purpose."""


class ConfigError(BackhaulError):
    """A configuration value is missing or invalid; the message names the key."""


class KeyFileError(BackhaulError):
    """A key file is missing, malformed, or has unsafe permissions."""


class SealError(BackhaulError):
    """Sealed credentials could not be opened: wrong key, tampered blob or wrong binding."""
