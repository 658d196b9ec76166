"""The member's versioned gateway keys, and the key operations the relay asks for."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent import reseal as ops
from agent.dispatch import Dispatcher
from agent.errors import KeyVersionUnavailable
from agent.head import RequestHead
from agent.keyring import Keyring, encode_key
from agent.state import AgentState
from backhaul import rotation as handover
from backhaul.errors import KeyFileError
from backhaul.keys import b64d, b64e, write_private
from backhaul.rotation import seal_successor
from backhaul.seal import GatewayKeyPair, open_sealed, seal, seal_to
from backhaul.wire import ErrorCode

GW = "gw_keyring"
BASE = "https://api.internal/v1/"


@pytest.fixture(scope="module")
def keys() -> list[GatewayKeyPair]:
    return [GatewayKeyPair.generate() for _ in range(3)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_create_load_and_add(tmp_path: Path, keys: list[GatewayKeyPair]) -> None:
    path = tmp_path / "keys" / "gateway.key"
    ring = Keyring.create(path, keys[0], 1)
    assert ring.versions == [1] and ring.current_version == 1
    assert ring.add(2, keys[1]) is True
    assert ring.add(2, keys[1]) is False  # idempotent
    for name in ("gateway.key", "gateway.1.key", "gateway.2.key"):
        assert _mode(path.parent / name) == 0o600, name
    assert path.read_bytes() == encode_key(keys[1])  # gateway.key is the newest
    loaded = Keyring.load(path)
    assert loaded.versions == [1, 2]
    assert loaded.get(1).to_bytes() == keys[0].to_bytes()
    assert loaded.current.to_bytes() == keys[1].to_bytes()
    with pytest.raises(KeyFileError, match="already held"):
        loaded.add(2, keys[2])


def test_an_older_version_does_not_replace_the_current_file(
    tmp_path: Path, keys: list[GatewayKeyPair]
) -> None:
    path = tmp_path / "gateway.key"
    ring = Keyring.create(path, keys[1], 5)
    ring.add(4, keys[0])
    assert path.read_bytes() == encode_key(keys[1])
    assert Keyring.load(path).versions == [4, 5]


def test_a_single_key_agent_is_version_one(tmp_path: Path, keys: list[GatewayKeyPair]) -> None:
    path = tmp_path / "keys" / "gateway.key"
    write_private(path, encode_key(keys[0]))
    ring = Keyring.load(path)
    assert ring.versions == [1]
    ring.add(2, keys[1])
    assert Keyring.load(path).versions == [1, 2]


def test_refuses_unsafe_or_inconsistent_files(tmp_path: Path, keys: list[GatewayKeyPair]) -> None:
    path = tmp_path / "gateway.key"
    ring = Keyring.create(path, keys[0], 1)
    ring.add(2, keys[1])
    os.chmod(ring.version_path(2), 0o644)
    with pytest.raises(KeyFileError, match="accessible by group or others"):
        Keyring.load(path)
    os.chmod(ring.version_path(2), 0o600)
    write_private(path, encode_key(keys[2]))  # matches no versioned key, and 1 is taken
    with pytest.raises(KeyFileError, match="matches none"):
        Keyring.load(path)
    write_private(ring.version_path(3), b"not a key\n")
    with pytest.raises(KeyFileError, match="not a gateway key"):
        Keyring.load(path)


def test_retire_keeps_the_newest(tmp_path: Path, keys: list[GatewayKeyPair]) -> None:
    path = tmp_path / "gateway.key"
    ring = Keyring.create(path, keys[0], 1)
    ring.add(2, keys[1])
    assert ring.retire(2) == [1]
    assert not ring.version_path(1).exists() and ring.version_path(2).exists()
    assert ring.retire(99) == []  # never the newest
    assert Keyring.load(path).versions == [2]
    with pytest.raises(KeyVersionUnavailable, match="version 1 is not held here"):
        ring.get(1)


# -------------------------------------------------------------------- rotation operations


def _gateway_key_op(current: GatewayKeyPair, new: GatewayKeyPair, **change: object) -> dict:
    head = {
        "op": "gateway-key",
        "from_version": 1,
        "key_version": 2,
        "public_key": new.public_text(),
        "transport": seal_successor(current, new, GW, 1, 2),
    }
    return head | change


def test_gateway_key_op(tmp_path: Path, keys: list[GatewayKeyPair]) -> None:
    ring = Keyring.create(tmp_path / "gateway.key", keys[0], 1)
    answer = ops.run_op(_gateway_key_op(keys[0], keys[1]), ring, GW)
    assert answer == {"key_version": 2, "public_key": keys[1].public_text()}
    assert Keyring.load(tmp_path / "gateway.key").versions == [1, 2]
    # Delivered twice (a retry): confirmed again, nothing rewritten.
    assert ops.run_op(_gateway_key_op(keys[0], keys[1]), ring, GW)["key_version"] == 2


def test_gateway_key_op_refusals(tmp_path: Path, keys: list[GatewayKeyPair]) -> None:
    ring = Keyring.create(tmp_path / "gateway.key", keys[0], 1)
    other = seal_successor(keys[2], keys[1], GW, 1, 2)  # sealed to another key
    # Sealed to the right key by someone who does not hold it (a relay): no valid proof.
    doc = {"private_key": b64e(keys[1].to_bytes()), "proof": b64e(b"\0" * 32)}
    forged = b64e(
        seal_to(keys[0].public_text(), handover._info(GW, 1, 2), json.dumps(doc).encode())
    )
    for head, message in (
        (_gateway_key_op(keys[0], keys[1], transport=other), "key handover refused"),
        (_gateway_key_op(keys[0], keys[1], transport=forged), "not made by a holder"),
        (_gateway_key_op(keys[0], keys[1], public_key=keys[2].public_text()), "another key"),
        (_gateway_key_op(keys[0], keys[1], extra=1), "bad GatewayKeyOp head: extra"),
        ({"op": "format-disk"}, "unknown operation"),
    ):
        with pytest.raises(ops._Refused, match=message):
            ops.run_op(head, ring, GW)
    with pytest.raises(ops._Refused, match="key handover refused"):
        ops.run_op(_gateway_key_op(keys[0], keys[1]), ring, "gw_other")
    with pytest.raises(KeyVersionUnavailable):
        ops.run_op(_gateway_key_op(keys[0], keys[1], from_version=7, key_version=8), ring, GW)
    assert ring.versions == [1]


def _reseal_op(blob: bytes, **change: object) -> dict:
    head = {
        "op": "reseal",
        "connection_id": "cxn_1",
        "base_url": BASE,
        "suite": "MLKEM768_X25519/HKDF_SHA256/CHACHA20_POLY1305",
        "sealed": b64e(blob),
        "from_version": 1,
        "to_version": 2,
    }
    return head | change


def test_reseal_op_seals_to_its_own_next_key(tmp_path: Path, keys: list[GatewayKeyPair]) -> None:
    ring = Keyring.create(tmp_path / "gateway.key", keys[0], 1)
    _, blob = seal(keys[0].public_text(), "cxn_1", BASE, {"username": "u", "password": "p"})
    with pytest.raises(KeyVersionUnavailable):  # no version 2 yet
        ops.run_op(_reseal_op(blob), ring, GW)
    ring.add(2, keys[1])
    answer = ops.run_op(_reseal_op(blob), ring, GW)
    assert answer["key_version"] == 2
    new_blob = b64d(answer["sealed"])
    assert open_sealed(keys[1], answer["suite"], new_blob, "cxn_1", BASE)["password"] == "p"
    with pytest.raises(ops._Refused, match="do not open here"):
        ops.run_op(_reseal_op(blob, connection_id="cxn_2"), ring, GW)
    with pytest.raises(ops._Refused, match="do not open here"):
        ops.run_op(_reseal_op(blob, base_url="https://evil/"), ring, GW)
    with pytest.raises(ops._Refused, match="higher"):
        ops.run_op(_reseal_op(blob, from_version=2, to_version=1), ring, GW)
    with pytest.raises(ops._Refused, match="public_key"):  # the relay cannot name a key
        ops.run_op(_reseal_op(blob, public_key=keys[2].public_text()), ring, GW)


def test_retire_op(tmp_path: Path, keys: list[GatewayKeyPair]) -> None:
    ring = Keyring.create(tmp_path / "gateway.key", keys[0], 1)
    ring.add(2, keys[1])
    assert ops.run_op({"op": "retire-keys", "keep_from": 2}, ring, GW) == {
        "retired": [1],
        "held": [2],
    }


def test_dispatcher_opens_with_the_version_the_head_names(
    tmp_path: Path, keys: list[GatewayKeyPair]
) -> None:
    ring = Keyring.create(tmp_path / "gateway.key", keys[0], 1)
    dispatcher = Dispatcher(None, ring, AgentState("https://r", "mem_1", GW))  # type: ignore[arg-type]
    suite, blob = seal(keys[1].public_text(), "cxn_1", BASE, {"api_key": "k2"})
    head = {
        "method": "GET",
        "url": BASE + "x",
        "headers": [],
        "connection_id": "cxn_1",
        "base_url": BASE,
        "auth": {"type": "api_key", "api_key_name": "X-Key", "api_key_in": "header"},
        "suite": suite,
        "sealed": b64e(blob),
        "timeout_ms": 1000,
    }
    assert RequestHead.parse(head).key_version == 1  # a relay from before rotation
    with pytest.raises(KeyVersionUnavailable) as info:
        dispatcher._open(RequestHead.parse(head | {"key_version": 2}))
    assert dispatcher_reset_code(info.value) is ErrorCode.REFUSED_STREAM
    ring.add(2, keys[1])
    assert dispatcher._open(RequestHead.parse(head | {"key_version": 2})) == {"api_key": "k2"}


def dispatcher_reset_code(exc: KeyVersionUnavailable) -> ErrorCode:
    from agent.dispatch import RESET_CODES

    return RESET_CODES[exc.code]
