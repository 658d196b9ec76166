"""Recovery keys, the wrapped gateway key, and the key handover of a rotation."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from backhaul import recovery
from backhaul.errors import SealError
from backhaul.keys import b64d, b64e
from backhaul.recovery import RecoveryKeyError
from backhaul.rotation import open_successor, reseal, rotation_request, seal_successor
from backhaul.seal import GatewayKeyPair, open_sealed, seal

GW = "gw_0123456789abcdef0123"
PRIVATE = bytes(range(96))


@pytest.fixture(scope="module")
def key() -> tuple[recovery.RecoveryKey, str]:
    return recovery.generate()


@pytest.fixture(scope="module")
def blob(key: tuple[recovery.RecoveryKey, str]) -> dict[str, Any]:
    return recovery.wrap(key[0], PRIVATE, GW, 1)


# -------------------------------------------------------------------- the key format


def test_generated_key_format(key: tuple[recovery.RecoveryKey, str]) -> None:
    secret, text = key
    assert re.fullmatch(r"bhrk_[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){13}", text), text
    assert len(secret.secret) == 32 and secret.kind == "key"
    assert recovery.parse(text) == secret
    assert "secret" in repr(secret) and text not in repr(secret)
    assert recovery.generate()[1] != text


def test_parse_forgives_case_spacing_and_lookalikes(key: tuple[recovery.RecoveryKey, str]) -> None:
    secret, text = key
    assert recovery.parse("  " + text.lower() + "\n") == secret
    assert recovery.parse(text.replace("-", " ")) == secret
    assert recovery.parse(text.removeprefix("bhrk_")) == secret
    # Crockford base32: O reads as 0, I and L as 1.
    lookalike = "bhrk_" + text[5:].replace("0", "O").replace("1", "l")
    assert recovery.parse(lookalike) == secret


def _typo(text: str) -> str:
    body = text[5:]
    i = next(i for i, c in enumerate(body) if c not in "-Z")
    return "bhrk_" + body[:i] + ("Z" if body[i] != "Z" else "Y") + body[i + 1 :]


def test_a_typo_is_caught_before_any_key_derivation(
    key: tuple[recovery.RecoveryKey, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, text = key

    def no_kdf(*args: object) -> bytes:
        raise AssertionError("scrypt ran on a malformed key")

    monkeypatch.setattr(recovery, "_derive", no_kdf)
    with pytest.raises(RecoveryKeyError, match="checksum does not match"):
        recovery.parse(_typo(text))
    with pytest.raises(RecoveryKeyError, match="missing or extra character"):
        recovery.parse(text[:-1])
    with pytest.raises(RecoveryKeyError, match="missing or extra character"):
        recovery.parse(text + "7")
    with pytest.raises(RecoveryKeyError, match="empty"):
        recovery.parse("   ")


def test_passphrases_need_sixteen_characters() -> None:
    with pytest.raises(RecoveryKeyError, match="at least 16"):
        recovery.parse("too-short")
    phrase = recovery.parse("correct horse battery staple")
    assert phrase.kind == "passphrase" and phrase.params == recovery.PASSPHRASE_PARAMS


def test_error_messages_never_echo_the_input(key: tuple[recovery.RecoveryKey, str]) -> None:
    _, text = key
    for bad in (_typo(text), text[:-1], "short-secret"):
        with pytest.raises(RecoveryKeyError) as info:
            recovery.parse(bad)
        assert bad not in str(info.value) and bad[5:20] not in str(info.value)


# -------------------------------------------------------------------- wrapping


def test_wrap_round_trip(key: tuple[recovery.RecoveryKey, str], blob: dict[str, Any]) -> None:
    assert set(blob) == {"v", "kdf", "n", "r", "p", "salt", "nonce", "ct"}
    assert (blob["v"], blob["kdf"]) == (1, "scrypt")
    assert (blob["n"], blob["r"], blob["p"]) == recovery.KEY_PARAMS
    assert blob["n"] >= 2**15
    assert len(b64d(blob["salt"])) == 16 and len(b64d(blob["nonce"])) == 12
    assert PRIVATE not in json.dumps(blob).encode() and b64e(PRIVATE) not in json.dumps(blob)
    assert recovery.unwrap(key[0], blob, GW, 1) == PRIVATE
    assert recovery.unwrap(recovery.parse(key[1]), json.dumps(blob), GW, 1) == PRIVATE


def test_wrong_recovery_key(blob: dict[str, Any]) -> None:
    with pytest.raises(RecoveryKeyError) as info:
        recovery.unwrap(recovery.generate()[0], blob, GW, 1)
    assert str(info.value) == "wrong recovery key"


@pytest.mark.parametrize(("gateway", "version"), [("gw_other", 1), (GW, 2)])
def test_blob_is_bound_to_gateway_and_version(
    key: tuple[recovery.RecoveryKey, str], blob: dict[str, Any], gateway: str, version: int
) -> None:
    with pytest.raises(RecoveryKeyError, match="wrong recovery key"):
        recovery.unwrap(key[0], blob, gateway, version)


def test_tampered_blob(key: tuple[recovery.RecoveryKey, str], blob: dict[str, Any]) -> None:
    ct = bytearray(b64d(blob["ct"]))
    ct[0] ^= 1
    with pytest.raises(RecoveryKeyError, match="wrong recovery key"):
        recovery.unwrap(key[0], blob | {"ct": b64e(bytes(ct))}, GW, 1)


def test_passphrase_round_trip() -> None:
    phrase = recovery.parse("correct horse battery staple")
    wrapped = recovery.wrap(phrase, PRIVATE, GW, 3)
    assert wrapped["n"] == 2**17
    assert recovery.unwrap(recovery.parse(" correct horse battery staple "), wrapped, GW, 3) == (
        PRIVATE
    )
    with pytest.raises(RecoveryKeyError, match="wrong recovery key"):
        recovery.unwrap(recovery.parse("correct horse battery stapler"), wrapped, GW, 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": 2**30}, "out of range"),
        ({"n": 1000}, "out of range"),
        ({"r": 0}, "positive integer"),
        ({"kdf": "pbkdf2"}, "unsupported"),
        ({"nonce": "AAAA"}, "nonce is malformed"),
        ({"extra": 1}, "unexpected or missing"),
        ({"ct": 5}, "ct is malformed"),
    ],
)
def test_malformed_blobs_are_refused_before_scrypt(
    blob: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    with pytest.raises(RecoveryKeyError, match=message):
        recovery.check_blob(blob | change)
    for text in ("[]", "not json", "x" * 5000):
        with pytest.raises(RecoveryKeyError):
            recovery.check_blob(text)


# -------------------------------------------------------------------- the key handover


@pytest.fixture(scope="module")
def pair() -> tuple[GatewayKeyPair, GatewayKeyPair]:
    return GatewayKeyPair.generate(), GatewayKeyPair.generate()


def test_handover_round_trip(pair: tuple[GatewayKeyPair, GatewayKeyPair]) -> None:
    current, successor = pair
    transport = seal_successor(current, successor, GW, 1, 2)
    opened = open_successor(current, transport, GW, 1, 2, successor.public_text())
    assert opened.to_bytes() == successor.to_bytes()
    assert b64e(successor.to_bytes()) not in transport


def test_handover_opens_only_for_its_binding(pair: tuple[GatewayKeyPair, GatewayKeyPair]) -> None:
    current, successor = pair
    transport = seal_successor(current, successor, GW, 1, 2)
    for gateway, old, new in (("gw_x", 1, 2), (GW, 1, 3), (GW, 2, 3)):
        with pytest.raises(SealError):
            open_successor(current, transport, gateway, old, new)
    with pytest.raises(SealError):
        open_successor(successor, transport, GW, 1, 2)
    with pytest.raises(SealError, match="another key"):
        open_successor(current, transport, GW, 1, 2, GatewayKeyPair.generate().public_text())


def test_a_relay_cannot_forge_a_handover(pair: tuple[GatewayKeyPair, GatewayKeyPair]) -> None:
    """Anyone can seal to the public key; only a holder of the private key can prove it."""
    from backhaul import rotation

    current, _ = pair
    forged_key = GatewayKeyPair.generate()
    doc = {"private_key": b64e(forged_key.to_bytes()), "proof": b64e(b"\0" * 32)}
    blob = rotation.seal_to(
        current.public_text(),
        rotation._info(GW, 1, 2),
        json.dumps(doc).encode(),
    )
    with pytest.raises(SealError, match="not made by a holder"):
        open_successor(current, b64e(blob), GW, 1, 2)


def test_reseal_keeps_the_binding(pair: tuple[GatewayKeyPair, GatewayKeyPair]) -> None:
    old, new = pair
    suite, blob = seal(old.public_text(), "cxn_1", "https://api/", {"api_key": "k"})
    suite2, blob2 = reseal(old, new, suite, blob, "cxn_1", "https://api/")
    assert open_sealed(new, suite2, blob2, "cxn_1", "https://api/") == {"api_key": "k"}
    with pytest.raises(SealError):
        open_sealed(old, suite2, blob2, "cxn_1", "https://api/")
    with pytest.raises(SealError):  # a relay asking to move it elsewhere gets nothing
        reseal(old, new, suite, blob, "cxn_2", "https://api/")


def test_rotation_request(key: tuple[recovery.RecoveryKey, str]) -> None:
    current = GatewayKeyPair.generate()
    doc = {
        "gateway_id": GW,
        "key_version": 4,
        "hpke_public_key": current.public_text(),
        "wrapped_private_key": recovery.wrap(key[0], current.to_bytes(), GW, 4),
    }
    body = rotation_request(doc, key[0])
    assert body["key_version"] == 5
    new = open_successor(current, body["transport"], GW, 4, 5, body["hpke_public_key"])
    assert recovery.unwrap(key[0], body["wrapped_private_key"], GW, 5) == new.to_bytes()
    with pytest.raises(RecoveryKeyError, match="wrong recovery key"):
        rotation_request(doc, recovery.generate()[0])
    with pytest.raises(SealError, match="does not match"):
        rotation_request(doc | {"hpke_public_key": new.public_text()}, key[0])


def test_logs_redact_recovery_keys(key: tuple[recovery.RecoveryKey, str]) -> None:
    from backhaul.logging import redact, redact_text

    _, text = key
    assert text not in redact_text(f"enroll --recovery-key {text} failed")
    assert text[5:] not in redact_text(f"key={text}")
    assert redact({"event": "x", "recovery_key": "correct horse battery"})["recovery_key"] != (
        "correct horse battery"
    )
