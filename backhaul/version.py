"""Version numbers: the package's and the tunnel protocol's; and which build runs."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES

__version__ = "0.1.0"

#: Tunnel protocol version spoken by this build (HELLO carries it).
PROTOCOL_VERSION = 1
#: Versions the relay still accepts from agents: the current and the previous one.
SUPPORTED_PROTOCOL_VERSIONS = frozenset({PROTOCOL_VERSION, PROTOCOL_VERSION - 1} - {0})
#: WebSocket subprotocol negotiated on /v1/tunnel.
SUBPROTOCOL = "backhaul.v1"


def build() -> str:
    """``"mypyc"`` when the data path runs compiled (setup.py's ``BACKHAUL_MYPYC=1`` build),
    ``"python"`` when it runs from source."""
    from backhaul.wire import frames

    return "mypyc" if frames.__file__.endswith(tuple(EXTENSION_SUFFIXES)) else "python"
