"""The relay's handling of an agent's first message (``relay.tunnel._handshake``) under
hypothesis: whatever arrives, the relay welcomes a member only for a valid signature over its
own fresh challenge, and otherwise refuses with a code or sees the transport close — no other
exception escapes to the endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backhaul import handshake
from backhaul.aio.tunnel import TransportClosed, Tunnel
from backhaul.keys import public_key_text
from backhaul.wire import Connection, Role
from backhaul.wire import frames as f
from relay import tunnel as relay_tunnel
from relay.hub import LiveTunnel
from tests.fuzzing import budget

KEY = ed25519.Ed25519PrivateKey.generate()


@dataclass
class Member:
    id: str = "mbr_known"
    gateway_id: str = "gw_known"
    revoked: bool = False
    signing_public_key: str = public_key_text(KEY)
    priority: int = 0
    disabled: bool = False


class OneShotTransport:
    """Hands the relay one message (when the relay's HELLO is out), then closes."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer  # relay HELLO payload -> bytes
        self.sent: list[bytes] = []
        self.delivered = False

    async def recv(self) -> bytes:
        if self.delivered:
            raise TransportClosed("closed")
        self.delivered = True
        relay = json.loads(f.decode(self.sent[0], 1 << 20).payload)
        message: bytes = self.answer(relay)
        return message

    async def send(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    async def close(self, code: int, reason: str) -> None:
        pass


@contextlib.asynccontextmanager
async def _no_db() -> AsyncIterator[None]:
    yield None


@pytest.fixture(autouse=True)
def one_member(monkeypatch: pytest.MonkeyPatch) -> None:
    async def member_for_handshake(session: Any, member_id: str) -> Member | None:
        return Member() if member_id == "mbr_known" else None

    async def touch_member(*args: Any) -> None:
        return None

    monkeypatch.setattr(relay_tunnel.queries, "member_for_handshake", member_for_handshake)
    monkeypatch.setattr(relay_tunnel.queries, "touch_member", touch_member)


def _run(
    answer: Any,
    held: bool = False,
    workers: int = 1,
    welcomes: list[dict[str, Any]] | None = None,
) -> tuple[str, Any]:
    """``held``: this relay (worker) holds a tunnel of the member already; ``welcomes``
    receives the WELCOME payload the relay sent, when it sent one."""
    ws = SimpleNamespace(
        app=SimpleNamespace(
            state=SimpleNamespace(
                db=_no_db,
                hub=SimpleNamespace(
                    instance_id="i", live=lambda member_id: object() if held else None
                ),
                workers=workers,
            )
        )
    )
    transport = OneShotTransport(answer)

    async def go() -> tuple[str, Any]:
        tunnel = Tunnel(Connection(Role.RELAY), transport)
        try:
            live = await asyncio.wait_for(relay_tunnel._handshake(ws, tunnel), 5)  # type: ignore[arg-type]
        except handshake.HandshakeRefused as exc:
            return "refused", exc
        except TransportClosed:
            return "closed", None
        except relay_tunnel.probe.Probe:
            return "probe", None
        if welcomes is not None:
            await tunnel.flush()
            welcome = f.decode(transport.sent[-1], 1 << 20)
            assert welcome.type == f.FrameType.WELCOME
            welcomes.append(json.loads(welcome.payload))
        return "welcome", live

    return asyncio.run(go())


json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.text(max_size=12), st.floats(allow_nan=False)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=4,
)
FIELDS = [
    "version",
    "member_id",
    "gateway_id",
    "agent_version",
    "hostname",
    "signature",
    "settings",
]


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, Any]:
    """(kind, answer): an honest HELLO, a tampered one, one signed for another challenge, or
    arbitrary bytes."""
    kind = draw(st.sampled_from(["honest", "tampered", "replayed", "bytes", "frame"]))
    edits = draw(st.lists(st.tuples(st.sampled_from(FIELDS), json_values), min_size=1, max_size=3))
    junk = draw(st.binary(max_size=80))
    ftype = draw(st.integers(0, 255))

    def answer(relay: dict[str, Any]) -> bytes:
        challenge_relay = relay if kind != "replayed" else handshake.relay_hello(b"\1" * 32)
        payload = handshake.agent_hello(challenge_relay, KEY, "mbr_known", "gw_known", "host")
        if kind == "tampered":
            for name, value in edits:
                payload[name] = value
        if kind == "bytes":
            return junk
        if kind == "frame":
            return f.HEADER.pack(ftype, 0, 0) + junk
        return f.encode_json(f.FrameType.HELLO, 0, payload)

    return kind, answer


@settings(
    max_examples=budget(1000),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=answers())
def test_the_relay_welcomes_only_a_valid_proof(case: tuple[str, Any]) -> None:
    kind, answer = case
    outcome, detail = _run(answer)
    if kind == "honest":
        assert outcome == "welcome"
        assert isinstance(detail, LiveTunnel) and detail.member_id == "mbr_known"
        return
    assert outcome in ("refused", "closed", "welcome"), outcome
    if outcome == "refused":
        assert len(detail.reason) < 200
    if outcome == "welcome":
        # Only a tamper that left the signed fields as they were can pass.
        assert kind == "tampered"
        assert detail.member_id == "mbr_known" and detail.gateway_id == "gw_known"
    if kind == "replayed":
        assert outcome == "refused" and detail.reason == "bad signature"


def test_a_signature_for_another_challenge_is_a_bad_signature() -> None:
    def replay(relay: dict[str, Any]) -> bytes:
        old = handshake.relay_hello(b"\2" * 32)
        return f.encode_json(
            f.FrameType.HELLO, 0, handshake.agent_hello(old, KEY, "mbr_known", "gw_known", "h")
        )

    outcome, exc = _run(replay)
    assert outcome == "refused" and exc.reason == "bad signature"


def _hello(additional: bool) -> Any:
    def answer(relay: dict[str, Any]) -> bytes:
        payload = handshake.agent_hello(
            relay, KEY, "mbr_known", "gw_known", "h", additional=additional
        )
        return f.encode_json(f.FrameType.HELLO, 0, payload)

    return answer


def test_a_relay_with_workers_says_how_many_in_welcome() -> None:
    welcomes: list[dict[str, Any]] = []
    outcome, live = _run(_hello(False), workers=3, welcomes=welcomes)
    assert outcome == "welcome" and welcomes[-1]["workers"] == 3 and not live.additional
    outcome, live = _run(_hello(False), welcomes=welcomes)
    assert outcome == "welcome" and "workers" not in welcomes[-1]
    assert len(welcomes) == 2


def test_an_additional_tunnel_is_refused_where_the_member_has_one_and_taken_elsewhere() -> None:
    outcome, exc = _run(_hello(True), held=True, workers=2)
    assert outcome == "refused"
    assert exc.code is relay_tunnel.ErrorCode.ALREADY_CONNECTED
    outcome, live = _run(_hello(True), held=False, workers=2)
    assert outcome == "welcome" and live.additional
    # A main tunnel is welcomed where the member has one: it replaces that one.
    outcome, live = _run(_hello(False), held=True, workers=2)
    assert outcome == "welcome" and not live.additional
