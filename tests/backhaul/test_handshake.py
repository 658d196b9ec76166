"""The tunnel handshake: the relay's challenge, the agent's Ed25519 proof, and its checks."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from backhaul import handshake
from backhaul.keys import b64d, b64e, public_key_text, verify_signature
from backhaul.version import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS
from backhaul.wire.errors import ErrorCode

MEMBER = "mem_0123456789"
GATEWAY = "gw_abcdef"


def authenticate(
    challenge: bytes, payload: dict[str, Any], public_key: str, gateway_id: str = GATEWAY
) -> handshake.AgentClaim:
    """What the relay does with an agent HELLO: shape, membership, then the signature."""
    claim = handshake.parse_agent_hello(payload)
    if claim.gateway_id != gateway_id:
        raise handshake.HandshakeRefused(ErrorCode.UNAUTHORIZED, "unknown member")
    message = handshake.transcript(challenge, claim.member_id, claim.gateway_id, claim.version)
    if not verify_signature(public_key, claim.signature, message):
        raise handshake.HandshakeRefused(ErrorCode.UNAUTHORIZED, "bad signature")
    return claim


@pytest.fixture
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def challenge() -> bytes:
    return handshake.new_challenge()


def _hello(key: ed25519.Ed25519PrivateKey, challenge: bytes, **kw: str) -> dict[str, Any]:
    return handshake.agent_hello(
        handshake.relay_hello(challenge),
        key,
        kw.get("member_id", MEMBER),
        kw.get("gateway_id", GATEWAY),
        kw.get("hostname", "host-1"),
    )


def _refused(code: ErrorCode, func: Any, *args: Any) -> handshake.HandshakeRefused:
    with pytest.raises(handshake.HandshakeRefused) as info:
        func(*args)
    assert info.value.code is code, info.value.reason
    return info.value


# ---------------------------------------------------------------- messages


def test_new_challenge_is_fresh_32_bytes() -> None:
    first, second = handshake.new_challenge(), handshake.new_challenge()
    assert len(first) == len(second) == handshake.CHALLENGE_SIZE == 32
    assert first != second


def test_relay_hello_shape(challenge: bytes) -> None:
    hello = handshake.relay_hello(challenge)
    assert hello["version"] == PROTOCOL_VERSION
    assert hello["versions"] == sorted(SUPPORTED_PROTOCOL_VERSIONS)
    assert b64d(hello["challenge"]) == challenge
    assert hello["relay"].startswith("backhaul-relay/")


def test_transcript_layout() -> None:
    assert handshake.transcript(b"C" * 32, "m", "g", 1) == (
        b"backhaul tunnel handshake v1\x00\x00" + b"C" * 32 + b"\x00m\x00g\x001"
    )


def test_agent_hello_shape(key: ed25519.Ed25519PrivateKey, challenge: bytes) -> None:
    hello = _hello(key, challenge)
    assert set(hello) == {
        "version",
        "member_id",
        "gateway_id",
        "agent_version",
        "hostname",
        "signature",
    }
    assert (hello["version"], hello["member_id"], hello["gateway_id"], hello["hostname"]) == (
        PROTOCOL_VERSION,
        MEMBER,
        GATEWAY,
        "host-1",
    )
    assert len(b64d(hello["signature"])) == 64


# ---------------------------------------------------------------- the proof


def test_signature_is_accepted(key: ed25519.Ed25519PrivateKey, challenge: bytes) -> None:
    claim = authenticate(challenge, _hello(key, challenge), public_key_text(key))
    assert claim == handshake.AgentClaim(
        member_id=MEMBER,
        gateway_id=GATEWAY,
        version=PROTOCOL_VERSION,
        agent_version=claim.agent_version,
        hostname="host-1",
        signature=b64d(_hello(key, challenge)["signature"]),
    )
    assert claim.agent_version


def test_wrong_key_is_refused(key: ed25519.Ed25519PrivateKey, challenge: bytes) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    error = _refused(
        ErrorCode.UNAUTHORIZED,
        authenticate,
        challenge,
        _hello(key, challenge),
        public_key_text(other),
    )
    assert error.reason == "bad signature"


def test_wrong_challenge_is_refused(key: ed25519.Ed25519PrivateKey, challenge: bytes) -> None:
    other = bytes(b ^ 1 for b in challenge)
    _refused(
        ErrorCode.UNAUTHORIZED, authenticate, other, _hello(key, challenge), public_key_text(key)
    )


def test_signature_for_another_member_is_refused(
    key: ed25519.Ed25519PrivateKey, challenge: bytes
) -> None:
    hello = _hello(key, challenge)
    hello["member_id"] = "mem_someone_else"
    _refused(ErrorCode.UNAUTHORIZED, authenticate, challenge, hello, public_key_text(key))


def test_signature_for_another_gateway_is_refused(
    key: ed25519.Ed25519PrivateKey, challenge: bytes
) -> None:
    hello = _hello(key, challenge, gateway_id="gw_other")
    # Claiming the other gateway fails membership; relabelling it fails the signature.
    _refused(ErrorCode.UNAUTHORIZED, authenticate, challenge, hello, public_key_text(key))
    hello["gateway_id"] = GATEWAY
    _refused(ErrorCode.UNAUTHORIZED, authenticate, challenge, hello, public_key_text(key))


def test_replay_onto_a_new_challenge_is_refused(key: ed25519.Ed25519PrivateKey) -> None:
    first = handshake.new_challenge()
    recorded = _hello(key, first)
    assert authenticate(first, recorded, public_key_text(key)).member_id == MEMBER
    second = handshake.new_challenge()
    _refused(ErrorCode.UNAUTHORIZED, authenticate, second, recorded, public_key_text(key))


def test_signature_under_another_version_is_refused(
    key: ed25519.Ed25519PrivateKey, challenge: bytes
) -> None:
    signature = key.sign(handshake.transcript(challenge, MEMBER, GATEWAY, PROTOCOL_VERSION + 1))
    hello = _hello(key, challenge)
    hello["signature"] = b64e(signature)
    _refused(ErrorCode.UNAUTHORIZED, authenticate, challenge, hello, public_key_text(key))


def test_tampered_signature_is_refused(key: ed25519.Ed25519PrivateKey, challenge: bytes) -> None:
    hello = _hello(key, challenge)
    raw = bytearray(b64d(hello["signature"]))
    raw[10] ^= 0x80
    hello["signature"] = b64e(bytes(raw))
    _refused(ErrorCode.UNAUTHORIZED, authenticate, challenge, hello, public_key_text(key))
    hello["signature"] = b64e(b"short")
    _refused(ErrorCode.UNAUTHORIZED, authenticate, challenge, hello, public_key_text(key))


# ---------------------------------------------------------------- versions


@pytest.mark.parametrize(
    "versions", [[PROTOCOL_VERSION + 1], [], None, "1", [str(PROTOCOL_VERSION)]]
)
def test_agent_refuses_relay_without_a_shared_version(
    key: ed25519.Ed25519PrivateKey, challenge: bytes, versions: Any
) -> None:
    relay = handshake.relay_hello(challenge)
    relay["versions"] = versions
    _refused(ErrorCode.UNSUPPORTED_VERSION, handshake.agent_hello, relay, key, MEMBER, GATEWAY, "h")


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 99, "1", None, 1.0, True, [1]])
def test_relay_refuses_unsupported_agent_versions(
    key: ed25519.Ed25519PrivateKey, challenge: bytes, version: Any
) -> None:
    hello = _hello(key, challenge)
    hello["version"] = version
    error = _refused(ErrorCode.UNSUPPORTED_VERSION, handshake.parse_agent_hello, hello)
    assert "not supported" in error.reason


def test_missing_version_is_unsupported(key: ed25519.Ed25519PrivateKey, challenge: bytes) -> None:
    hello = _hello(key, challenge)
    del hello["version"]
    _refused(ErrorCode.UNSUPPORTED_VERSION, handshake.parse_agent_hello, hello)


# ---------------------------------------------------------------- malformed fields


@pytest.mark.parametrize(
    "name", ["member_id", "gateway_id", "agent_version", "hostname", "signature"]
)
@pytest.mark.parametrize("value", [None, "", 7, ["x"], "x" * 513, "MISSING"])
def test_malformed_agent_fields(
    key: ed25519.Ed25519PrivateKey, challenge: bytes, name: str, value: Any
) -> None:
    hello = _hello(key, challenge)
    if value == "MISSING":
        del hello[name]
    else:
        hello[name] = value
    error = _refused(ErrorCode.PROTOCOL_ERROR, handshake.parse_agent_hello, hello)
    assert name in error.reason


def test_field_at_the_length_limit_is_accepted(
    key: ed25519.Ed25519PrivateKey, challenge: bytes
) -> None:
    hello = _hello(key, challenge, hostname="h" * 512)
    assert handshake.parse_agent_hello(hello).hostname == "h" * 512


@pytest.mark.parametrize("signature", ["A", "AAAAA", "\u00e9\u00e9\u00e9\u00e9"])
def test_signature_not_base64(
    key: ed25519.Ed25519PrivateKey, challenge: bytes, signature: str
) -> None:
    hello = _hello(key, challenge)
    hello["signature"] = signature
    _refused(ErrorCode.UNAUTHORIZED, handshake.parse_agent_hello, hello)


@pytest.mark.parametrize(
    "challenge_value",
    [None, 5, "A", b64e(b"x" * 31), b64e(b"x" * 33), "\u00e9\u00e9\u00e9\u00e9"],
)
def test_malformed_relay_challenge(key: ed25519.Ed25519PrivateKey, challenge_value: Any) -> None:
    relay = handshake.relay_hello(b"\x00" * 32)
    if challenge_value is None:
        del relay["challenge"]
    else:
        relay["challenge"] = challenge_value
    _refused(ErrorCode.PROTOCOL_ERROR, handshake.agent_hello, relay, key, MEMBER, GATEWAY, "h")


def test_refusal_carries_code_and_reason() -> None:
    error = handshake.HandshakeRefused(ErrorCode.UNAUTHORIZED, "member revoked")
    assert (error.code, error.reason, str(error)) == (
        ErrorCode.UNAUTHORIZED,
        "member revoked",
        "member revoked",
    )
