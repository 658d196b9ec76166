"""Version numbers: the package's and the tunnel protocol's."""

__version__ = "0.1.0"

#: Tunnel protocol version spoken by this build (HELLO carries it).
PROTOCOL_VERSION = 1
#: Versions the relay still accepts from agents: the current and the previous one.
SUPPORTED_PROTOCOL_VERSIONS = frozenset({PROTOCOL_VERSION, PROTOCOL_VERSION - 1} - {0})
#: WebSocket subprotocol negotiated on /v1/tunnel.
SUBPROTOCOL = "backhaul.v1"
