"""The tunnel handshake's messages and the Ed25519 proof, without I/O.

1. relay → agent HELLO  ``{"version", "versions", "challenge", "relay"}``: a fresh 32-byte
   challenge for this connection only.
2. agent → relay HELLO  ``{"version", "member_id", "gateway_id", "agent_version",
   "hostname", "signature"}``: the member's Ed25519 signature over the transcript below.
   ``"probe": true`` marks ``backhaul-agent diagnose``: the relay checks the proof and sends
   WELCOME as usual but never routes to that connection (the running agent keeps its tunnel).
   ``"additional": true`` marks one more tunnel of a member that has one already, opened to
   reach another worker process of the relay (``agent.spread``): it never replaces a tunnel.
3. relay → agent WELCOME ``{"session_id", "member_id", "ping_interval"}``, plus
   ``"workers": N`` when N worker processes of the relay serve this address, or a close with
   ``4000 + ErrorCode.UNAUTHORIZED`` before any stream exists (``4000 +
   ErrorCode.ALREADY_CONNECTED`` for an additional tunnel that reached a worker holding one).

The transcript binds the challenge to the member and gateway ids and to the protocol
version, so a signature can't be replayed on another connection or for another member.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from backhaul.keys import b64d, b64e
from backhaul.version import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS, __version__
from backhaul.wire.errors import ErrorCode

CHALLENGE_SIZE = 32
_CONTEXT = b"backhaul tunnel handshake v1\x00"


class HandshakeRefused(Exception):
    """The peer's HELLO is not acceptable; ``code`` goes into the close frame."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _brief(value: Any) -> str:
    """A peer's value, shown in a refusal (a log line, a close reason) at bounded length."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_SIZE)


def relay_hello(challenge: bytes) -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "versions": sorted(SUPPORTED_PROTOCOL_VERSIONS),
        "challenge": b64e(challenge),
        "relay": f"backhaul-relay/{__version__}",
    }


def transcript(challenge: bytes, member_id: str, gateway_id: str, version: int) -> bytes:
    return b"\x00".join(
        [_CONTEXT, challenge, member_id.encode(), gateway_id.encode(), str(version).encode()]
    )


def agent_hello(
    relay: dict[str, Any],
    key: ed25519.Ed25519PrivateKey,
    member_id: str,
    gateway_id: str,
    hostname: str,
    probe: bool = False,
    additional: bool = False,
) -> dict[str, Any]:
    """Answer the relay's HELLO; raises HandshakeRefused if we share no version."""
    versions = relay.get("versions")
    if not isinstance(versions, list) or PROTOCOL_VERSION not in versions:
        raise HandshakeRefused(
            ErrorCode.UNSUPPORTED_VERSION, f"relay speaks protocol versions {_brief(versions)}"
        )
    challenge = _challenge(relay)
    signature = key.sign(transcript(challenge, member_id, gateway_id, PROTOCOL_VERSION))
    hello: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "member_id": member_id,
        "gateway_id": gateway_id,
        "agent_version": __version__,
        "hostname": hostname,
        "signature": b64e(signature),
    }
    if probe:
        hello["probe"] = True
    if additional:
        hello["additional"] = True
    return hello


@dataclass(frozen=True)
class AgentClaim:
    member_id: str
    gateway_id: str
    version: int
    agent_version: str
    hostname: str
    signature: bytes
    probe: bool = False
    additional: bool = False


def parse_agent_hello(payload: dict[str, Any]) -> AgentClaim:
    """Validate the shape of the agent's HELLO (the signature is checked by the caller)."""
    version = payload.get("version")
    if (
        not isinstance(version, int)
        or isinstance(version, bool)
        or version not in SUPPORTED_PROTOCOL_VERSIONS
    ):
        raise HandshakeRefused(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {_brief(version)} not supported; this relay accepts "
            f"{sorted(SUPPORTED_PROTOCOL_VERSIONS)}",
        )
    fields = {}
    for name in ("member_id", "gateway_id", "agent_version", "hostname", "signature"):
        value = payload.get(name)
        if not isinstance(value, str) or not value or len(value) > 512:
            raise HandshakeRefused(ErrorCode.PROTOCOL_ERROR, f"HELLO field {name} is invalid")
        fields[name] = value
    try:
        signature = b64d(fields["signature"])
    except ValueError as exc:
        raise HandshakeRefused(ErrorCode.UNAUTHORIZED, "signature is not base64") from exc
    return AgentClaim(
        fields["member_id"],
        fields["gateway_id"],
        version,
        fields["agent_version"],
        fields["hostname"],
        signature,
        payload.get("probe") is True,
        payload.get("additional") is True,
    )


def _challenge(relay: dict[str, Any]) -> bytes:
    raw = relay.get("challenge")
    if not isinstance(raw, str):
        raise HandshakeRefused(ErrorCode.PROTOCOL_ERROR, "relay HELLO has no challenge")
    try:
        challenge = b64d(raw)
    except ValueError as exc:
        raise HandshakeRefused(ErrorCode.PROTOCOL_ERROR, "relay challenge is not base64") from exc
    if len(challenge) != CHALLENGE_SIZE:
        raise HandshakeRefused(ErrorCode.PROTOCOL_ERROR, "relay challenge has the wrong size")
    return challenge
