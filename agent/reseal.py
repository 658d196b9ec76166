"""Key-rotation requests from the relay: take the gateway's next key, re-seal one
connection's credentials to it, retire old keys.

They arrive as streams whose OPEN head has an ``"op"`` field instead of a method and URL,
and are answered with RESPONSE 200 and a small JSON body, or a RESET whose reason says what
went wrong. The relay is not trusted with any of this:

* ``gateway-key`` ``{"op", "from_version", "key_version", "public_key", "transport"}``: the
  transport opens only with a key this member holds and must prove that its author held that
  key too (:func:`backhaul.rotation.open_successor`), so a relay cannot slip in a key of its
  own. Answer ``{"key_version", "public_key"}``.
* ``reseal`` ``{"op", "connection_id", "base_url", "suite", "sealed", "from_version",
  "to_version"}``: opened with ``from_version`` and sealed to the public half of
  ``to_version`` -- both keys from this member's keyring, never a key named by the relay --
  with the same binding. Answer ``{"suite", "sealed", "key_version"}``.
* ``retire-keys`` ``{"op", "keep_from"}``: forget versions below ``keep_from`` (never the
  newest). Answer ``{"retired", "held"}``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from agent.errors import KeyVersionUnavailable
from agent.keyring import Keyring
from backhaul.aio.tunnel import StreamError, TransportClosed, TunnelStream
from backhaul.errors import BackhaulError, SealError
from backhaul.keys import b64d, b64e
from backhaul.rotation import open_successor, reseal
from backhaul.wire import ErrorCode

__all__ = ["OPS", "serve_op"]

log = structlog.get_logger("backhaul.agent.reseal")

Version = Annotated[StrictInt, Field(ge=1, le=10**9)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=1024 * 1024)]


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayKeyOp(_Op):
    op: Literal["gateway-key"]
    from_version: Version
    key_version: Version
    public_key: Text
    transport: Text


class ResealOp(_Op):
    op: Literal["reseal"]
    connection_id: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    base_url: Text
    suite: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    sealed: Text
    from_version: Version
    to_version: Version


class RetireKeysOp(_Op):
    op: Literal["retire-keys"]
    keep_from: Version


OPS: dict[str, type[_Op]] = {
    "gateway-key": GatewayKeyOp,
    "reseal": ResealOp,
    "retire-keys": RetireKeysOp,
}


class _Refused(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _parse(head: dict[str, Any]) -> _Op:
    model = OPS.get(str(head.get("op")))
    if model is None:
        raise _Refused(ErrorCode.BAD_REQUEST, f"unknown operation {str(head.get('op'))[:40]!r}")
    try:
        return model.model_validate(head)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) or "(head)" for e in exc.errors()[:5])
        raise _Refused(ErrorCode.BAD_REQUEST, f"bad {model.__name__} head: {fields}") from None


def _gateway_key(op: GatewayKeyOp, keyring: Keyring, gateway_id: str) -> dict[str, Any]:
    if keyring.has(op.key_version):
        if keyring.get(op.key_version).public_text() != op.public_key:
            raise _Refused(
                ErrorCode.CREDENTIALS_INVALID,
                f"gateway key version {op.key_version} is already held, with another public key",
            )
        return {"key_version": op.key_version, "public_key": op.public_key}
    current = keyring.get(op.from_version)
    try:
        successor = open_successor(
            current, op.transport, gateway_id, op.from_version, op.key_version, op.public_key
        )
    except SealError as exc:
        raise _Refused(ErrorCode.CREDENTIALS_INVALID, f"key handover refused: {exc}") from None
    keyring.add(op.key_version, successor)
    log.info("keys.added", key_version=op.key_version, held=keyring.versions)
    return {"key_version": op.key_version, "public_key": successor.public_text()}


def _reseal(op: ResealOp, keyring: Keyring) -> dict[str, Any]:
    if op.to_version <= op.from_version:
        raise _Refused(ErrorCode.BAD_REQUEST, "to_version must be higher than from_version")
    old, new = keyring.get(op.from_version), keyring.get(op.to_version)
    try:
        suite, blob = reseal(old, new, op.suite, b64d(op.sealed), op.connection_id, op.base_url)
    except (SealError, ValueError) as exc:
        raise _Refused(
            ErrorCode.CREDENTIALS_INVALID,
            f"sealed credentials of connection {op.connection_id} do not open here: {exc}",
        ) from None
    return {"suite": suite, "sealed": b64e(blob), "key_version": op.to_version}


def _retire(op: RetireKeysOp, keyring: Keyring) -> dict[str, Any]:
    gone = keyring.retire(op.keep_from)
    if gone:
        log.info("keys.retired", retired=gone, held=keyring.versions)
    return {"retired": gone, "held": keyring.versions}


def run_op(head: dict[str, Any], keyring: Keyring, gateway_id: str) -> dict[str, Any]:
    """Carry out one operation; raise _Refused (or an AgentError) when it can't be done."""
    op = _parse(head)
    if isinstance(op, GatewayKeyOp):
        return _gateway_key(op, keyring, gateway_id)
    if isinstance(op, ResealOp):
        return _reseal(op, keyring)
    assert isinstance(op, RetireKeysOp)
    return _retire(op, keyring)


async def serve_op(stream: TunnelStream, keyring: Keyring, gateway_id: str) -> None:
    """Answer one operation stream; every failure is a RESET, never an exception."""
    try:
        if stream.has_body:  # operations carry everything in the head
            while await stream.read():
                pass
        try:
            answer = run_op(stream.head or {}, keyring, gateway_id)
        except KeyVersionUnavailable as exc:
            raise _Refused(ErrorCode.REFUSED_STREAM, exc.message) from None
        except BackhaulError as exc:
            log.warning("keys.op_failed", op=str((stream.head or {}).get("op")), reason=str(exc))
            raise _Refused(ErrorCode.INTERNAL_ERROR, str(exc)) from None
        body = json.dumps(answer, separators=(",", ":")).encode()
        await stream.send_response(
            {"status": 200, "headers": [["content-type", "application/json"]]}
        )
        await stream.write(body)
        await stream.end()
    except _Refused as exc:
        log.warning(
            "keys.op_refused", op=str((stream.head or {}).get("op"))[:40], reason=exc.reason
        )
        await stream.reset(exc.code, exc.reason)
    except (StreamError, TransportClosed) as exc:
        log.info("keys.op_cancelled", stream_id=stream.id, reason=str(exc))
