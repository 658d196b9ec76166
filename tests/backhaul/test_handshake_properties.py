"""Property tests of the handshake's parsing, on both sides: whatever a peer puts in its
HELLO, parsing returns a claim or refuses with a code — never another exception — and a
claim is only ever what the payload said."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backhaul import handshake
from backhaul.keys import b64e
from backhaul.version import SUPPORTED_PROTOCOL_VERSIONS
from backhaul.wire import Connection, ErrorCode, HelloReceived, ProtocolError, Role, Settings
from backhaul.wire import frames as f
from tests.fuzzing import budget

KEY = ed25519.Ed25519PrivateKey.generate()
FIELDS = ["version", "member_id", "gateway_id", "agent_version", "hostname", "signature", "probe"]
REFUSAL_CODES = {ErrorCode.PROTOCOL_ERROR, ErrorCode.UNAUTHORIZED, ErrorCode.UNSUPPORTED_VERSION}

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.text(min_size=500, max_size=520),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=4,
)


def _valid_agent_hello() -> dict[str, Any]:
    relay = handshake.relay_hello(handshake.new_challenge())
    return handshake.agent_hello(relay, KEY, "mbr_a", "gw_a", "host")


@st.composite
def agent_hellos(draw: st.DrawFn) -> dict[str, Any]:
    """A valid agent HELLO with some fields dropped, replaced or added."""
    payload = _valid_agent_hello()
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        action = draw(st.sampled_from(["drop", "replace"]))
        if action == "drop":
            payload.pop(name, None)
        else:
            payload[name] = draw(json_values)
    payload.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2)))
    return payload


@settings(max_examples=budget(1500), deadline=None)
@given(payload=st.one_of(agent_hellos(), st.dictionaries(st.text(max_size=12), json_values)))
def test_parse_agent_hello_returns_a_claim_or_refuses_with_a_code(payload: dict[str, Any]) -> None:
    try:
        claim = handshake.parse_agent_hello(payload)
    except handshake.HandshakeRefused as exc:
        assert exc.code in REFUSAL_CODES
        # The reason reaches logs and close frames: short and printable, whatever was sent.
        assert exc.reason and len(exc.reason) < 200 and exc.reason.isprintable()
        return
    assert claim.version in SUPPORTED_PROTOCOL_VERSIONS
    for name in ("member_id", "gateway_id", "agent_version", "hostname"):
        value = getattr(claim, name)
        assert value == payload[name] and isinstance(value, str) and 0 < len(value) <= 512
    assert isinstance(claim.signature, bytes)


@st.composite
def relay_hellos(draw: st.DrawFn) -> dict[str, Any]:
    payload: dict[str, Any] = handshake.relay_hello(handshake.new_challenge())
    for name in draw(st.lists(st.sampled_from(["versions", "challenge", "version"]), max_size=3)):
        payload[name] = draw(
            st.one_of(
                json_values,
                st.binary(max_size=64).map(b64e),
                st.lists(st.integers(-3, 5), max_size=4),
            )
        )
    return payload


@settings(max_examples=budget(1000), deadline=None)
@given(relay=st.one_of(relay_hellos(), st.dictionaries(st.text(max_size=12), json_values)))
def test_agent_answers_a_relay_hello_or_refuses_with_a_code(relay: dict[str, Any]) -> None:
    """The agent's side: a relay HELLO with a bad challenge or no shared version is refused."""
    try:
        answer = handshake.agent_hello(relay, KEY, "mbr_a", "gw_a", "host")
    except handshake.HandshakeRefused as exc:
        assert exc.code in REFUSAL_CODES
        assert len(exc.reason) < 200 and exc.reason.isprintable()
        return
    challenge = handshake._challenge(relay)
    message = handshake.transcript(challenge, "mbr_a", "gw_a", answer["version"])
    KEY.public_key().verify(handshake.b64d(answer["signature"]), message)


@settings(max_examples=budget(1000), deadline=None)
@given(
    raw=st.one_of(
        json_values, st.dictionaries(st.sampled_from(list(Settings().to_dict())), json_values)
    )
)
def test_peer_settings_parse_or_end_the_tunnel_with_a_code(raw: Any) -> None:
    try:
        parsed = Settings.from_dict(raw)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.PROTOCOL_ERROR
        return
    assert parsed.max_message >= f.HEADER_SIZE + f.MAX_CONTROL_PAYLOAD


hello_frames = st.one_of(
    agent_hellos().map(lambda p: f.encode_json(f.FrameType.HELLO, 0, p)),
    st.binary(max_size=300).map(lambda b: f.encode(f.FrameType.HELLO, 0, b)),
    st.builds(
        lambda flags, sid, body: f.HEADER.pack(f.FrameType.HELLO, flags, sid) + body,
        st.integers(0, 255),
        st.integers(0, 2**32 - 1),
        st.one_of(st.binary(max_size=64), agent_hellos().map(lambda p: json.dumps(p).encode())),
    ),
    st.binary(max_size=40),
)


@settings(max_examples=budget(1500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=hello_frames)
def test_the_relay_connection_takes_any_first_message(message: bytes) -> None:
    """The relay's protocol state after its own HELLO: any first message from the agent is a
    HelloReceived, or ends the tunnel with a code — and nothing is opened before WELCOME."""
    conn = Connection(Role.RELAY)
    conn.send_hello(handshake.relay_hello(handshake.new_challenge()))
    conn.data_to_send()
    events = conn.receive_message(message)
    assert all(
        type(e).__name__
        in {"HelloReceived", "ConnectionTerminated", "UnknownFrameReceived", "StreamReset"}
        for e in events
    ), events
    hellos = [e for e in events if isinstance(e, HelloReceived)]
    if hellos:
        assert isinstance(hellos[0].payload, dict)
    assert not conn.accepting_streams
