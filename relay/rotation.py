"""Gateway key rotation, the relay's side: hand the new key to the members, have them
re-seal every connection, switch the gateway to the new key, retire the old one.

The relay never holds a gateway private key. The admin's CLI unwraps the current key with
the recovery key, makes the successor, and uploads three things (``POST
/v1/gateways/{id}/key-rotation``): the new public key, the new private key wrapped under the
same recovery key, and a *transport* -- the new private key sealed to the current public key
with a proof that its author held the current private key (:mod:`backhaul.rotation`).

State is kept in ``gateways.wrapped_private_key``, a JSON *key record* (:class:`KeyRecord`)::

    {"format": 1,
     "wrapped": {...},              the current key, wrapped (backhaul.recovery)
     "rotation": null | {           the rotation under way
        "phase": "delivering" | "complete",
        "from_version": N, "key_version": N+1, "hpke_public_key": "...",
        "wrapped": {...} | null,    the new key, wrapped; moves up at completion
        "transport": "...",         kept until every member has confirmed, then deleted
        "confirmed": [member ids], "refused": {member id: reason},
        "started_at": "...", "completed_at": "..." | null},
     "retire_after": "..." | null}  members may drop keys older than the current version

Steps (:func:`advance`, one at a time per gateway on this instance):

1. **deliver**: every connected member gets an OPEN ``{"op": "gateway-key", ...}``; it opens
   the transport with its current key, checks the proof, stores the new key and confirms.
   A member that refuses the transport makes the rotation fail as a whole (nothing changed).
2. **re-seal**: for every connection still sealed to an older version, a confirmed member is
   asked ``{"op": "reseal", ...}``: it opens the blob with the old key and seals it to the
   new one from its own keyring (never to a key the relay names); the relay swaps blob and
   ``key_version`` with a conditional UPDATE. Invokes keep working throughout: each OPEN
   says which key version its blob is sealed to, and members hold both.
3. **complete**: the gateway's public key, wrapped key and ``key_version`` become the new
   ones; new connections are sealed to it from now on.
4. **retire**: after :data:`RETIRE_GRACE_SECONDS` (requests already routed with the old blob
   finish), stragglers are re-sealed and members are told ``{"op": "retire-keys"}``.

With no member online, the rotation waits in "delivering" and finishes when one connects
(:func:`after_handshake`, called by the tunnel right after a member registers). A member that
was offline gets the new key the same way; until it has it, it answers requests sealed to the
new version with REFUSED_STREAM, which the invoke path retries on another member. The
transport is deleted once every non-revoked member has confirmed; while it exists a further
rotation is refused (revoke members that are gone for good).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import structlog

from backhaul.aio.background import Background
from backhaul.aio.tunnel import StreamError, TransportClosed
from backhaul.errors import SealError
from backhaul.keys import b64d, b64e
from backhaul.recovery import RecoveryKeyError, check_blob
from backhaul.seal import validate_public_key
from backhaul.wire import ErrorCode, StreamUnavailable
from relay.hub import Hub, LiveTunnel
from relay.problems import ProblemError
from relay.store import clusters
from relay.store.models import Gateway, utcnow

__all__ = [
    "OP_TIMEOUT_SECONDS",
    "RETIRE_GRACE_SECONDS",
    "KeyRecord",
    "Rotation",
    "advance",
    "after_handshake",
    "describe",
    "shutdown",
    "start",
]

log = structlog.get_logger("backhaul.relay.rotation")

#: How long members keep the previous key after a rotation completes.
RETIRE_GRACE_SECONDS = 60.0
#: How long one key operation on a member may take.
OP_TIMEOUT_SECONDS = 15.0
_RESEAL_PASSES = 5
_RESEAL_PARALLEL = 8
_MAX_ANSWER = 2 * 1024 * 1024
_MAX_TRANSPORT = 64 * 1024


# ----------------------------------------------------------------------- the key record


@dataclass
class Rotation:
    phase: Literal["delivering", "complete"]
    from_version: int
    key_version: int
    hpke_public_key: str
    transport: str
    wrapped: dict[str, Any] | None
    started_at: str
    completed_at: str | None = None
    confirmed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass
class KeyRecord:
    """What ``gateways.wrapped_private_key`` holds (see the module docstring)."""

    wrapped: dict[str, Any] | None = None
    rotation: Rotation | None = None
    retire_after: str | None = None

    @classmethod
    def load(cls, text: str | None) -> KeyRecord:
        if not text:
            return cls()
        doc = json.loads(text)
        if "kdf" in doc:  # a bare wrapped key
            return cls(wrapped=doc)
        rotation = doc.get("rotation")
        return cls(
            wrapped=doc.get("wrapped"),
            rotation=Rotation(**rotation) if rotation else None,
            retire_after=doc.get("retire_after"),
        )

    def dump(self) -> str:
        doc = {
            "format": 1,
            "wrapped": self.wrapped,
            "rotation": asdict(self.rotation) if self.rotation else None,
            "retire_after": self.retire_after,
        }
        return json.dumps(doc, separators=(",", ":"))


def describe(record: KeyRecord, active_members: list[str]) -> dict[str, Any] | None:
    """The rotation under way, for the API (no key material)."""
    r = record.rotation
    if r is None:
        return None
    return {
        "phase": r.phase,
        "from_version": r.from_version,
        "key_version": r.key_version,
        "started_at": r.started_at,
        "completed_at": r.completed_at,
        "confirmed": [m for m in active_members if m in r.confirmed],
        "pending": [m for m in active_members if m not in r.confirmed],
        "refused": dict(r.refused),
    }


def _now() -> str:
    return utcnow().isoformat()


# ----------------------------------------------------------------------- per-app registry


class _Registry:
    """Per relay instance: one lock per gateway, and the background tasks to cancel."""

    def __init__(self) -> None:
        self.locks: dict[str, asyncio.Lock] = {}
        self.tasks = Background()

    def lock(self, gateway_id: str) -> asyncio.Lock:
        return self.locks.setdefault(gateway_id, asyncio.Lock())


def _registry(app_state: Any) -> _Registry:
    registry = getattr(app_state, "key_rotations", None)
    if registry is None:
        registry = _Registry()
        app_state.key_rotations = registry
    assert isinstance(registry, _Registry)
    return registry


async def shutdown(app_state: Any) -> None:
    """Cancel background rotation work (relay shutdown); the record lets it resume later."""
    registry = getattr(app_state, "key_rotations", None)
    if not isinstance(registry, _Registry):
        return
    await registry.tasks.cancel()


# ----------------------------------------------------------------------- member operations


class _OpFailed(Exception):
    def __init__(self, reason: str, permanent: bool, code: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.code = code


_PERMANENT = frozenset(
    {ErrorCode.CREDENTIALS_INVALID, ErrorCode.BAD_REQUEST, ErrorCode.INTERNAL_ERROR}
)


def _reachable(live: LiveTunnel) -> bool:
    """Connected and accepting streams. Disabled members still hold keys, so they count."""
    return not live.tunnel.closed and live.tunnel.conn.accepting_streams


async def _op(live: LiveTunnel, head: dict[str, Any]) -> dict[str, Any]:
    """One key operation on one member; its JSON answer, or _OpFailed."""
    try:
        stream = await live.tunnel.open_stream(head, end_stream=True)
    except (StreamUnavailable, TransportClosed) as exc:
        raise _OpFailed(f"member unavailable: {exc}", permanent=False) from None
    try:
        async with asyncio.timeout(OP_TIMEOUT_SECONDS):
            response = await stream.response()
            body = bytearray()
            while chunk := await stream.read():
                body += chunk
                if len(body) > _MAX_ANSWER:
                    await stream.reset(ErrorCode.CANCEL, "answer too large")
                    raise _OpFailed("answer too large", permanent=True)
    except TimeoutError:
        await stream.reset(ErrorCode.CANCEL, "no answer in time")
        raise _OpFailed("no answer in time", permanent=False) from None
    except StreamError as exc:
        reason = exc.reason or exc.code.name
        if exc.code is ErrorCode.BAD_REQUEST:
            reason = f"the member refused the operation (is its agent too old?): {reason}"
        raise _OpFailed(reason, exc.code in _PERMANENT, exc.code) from None
    except TransportClosed as exc:
        raise _OpFailed(f"member disconnected: {exc}", permanent=False) from None
    if response.get("status") != 200:
        raise _OpFailed(f"member answered {response.get('status')}", permanent=True)
    try:
        doc = json.loads(bytes(body))
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise _OpFailed("member's answer is not a JSON object", permanent=True)
    return doc


# ----------------------------------------------------------------------- starting


async def start(
    app_state: Any,
    gateway_id: str,
    *,
    hpke_public_key: str,
    wrapped_private_key: dict[str, Any],
    transport: str,
    key_version: int,
) -> tuple[bool, dict[str, Any]]:
    """Record a new rotation and drive it as far as the online members allow.

    Returns (complete, status). Raises ProblemError for a request that cannot start.
    """
    try:
        validate_public_key(hpke_public_key)
    except SealError as exc:
        raise ProblemError(422, "Invalid request", f"hpke_public_key: {exc}") from None
    try:
        wrapped = check_blob(wrapped_private_key)
    except RecoveryKeyError as exc:
        raise ProblemError(422, "Invalid request", f"wrapped_private_key: {exc}") from None
    try:
        if not transport or len(transport) > _MAX_TRANSPORT or not b64d(transport):
            raise ValueError
    except ValueError:
        raise ProblemError(422, "Invalid request", "transport: must be base64url") from None

    registry = _registry(app_state)
    async with registry.lock(gateway_id):
        async with app_state.db() as session:
            gateway = await clusters.lock_gateway(session, gateway_id)
            record = KeyRecord.load(gateway.wrapped_private_key)
            active = await clusters.active_member_ids(session, gateway_id)
            _check_can_start(gateway, record, active, hpke_public_key, key_version)
            record.rotation = Rotation(
                phase="delivering",
                from_version=gateway.key_version,
                key_version=key_version,
                hpke_public_key=hpke_public_key,
                transport=transport,
                wrapped=wrapped,
                started_at=_now(),
            )
            gateway.wrapped_private_key = record.dump()
            await session.commit()
        log.info("rotation.started", gateway_id=gateway_id, key_version=key_version)
    # Shielded: an admin whose request times out does not stop the rotation half-way.
    task = registry.tasks.spawn(advance(app_state, gateway_id), f"rotate-{gateway_id}")
    return await asyncio.shield(task)


def _check_can_start(
    gateway: Gateway, record: KeyRecord, active: list[str], public_key: str, key_version: int
) -> None:
    if gateway.hpke_public_key is None:
        raise ProblemError(
            409, "Gateway has no key", f"gateway {gateway.id} has no member yet; enroll one first"
        )
    r = record.rotation
    if r is not None:
        if r.phase == "delivering":
            raise ProblemError(
                409,
                "Rotation in progress",
                f"gateway {gateway.id} is already rotating to key version {r.key_version}; "
                "it finishes when a member is online",
            )
        waiting = [m for m in active if m not in r.confirmed]
        if waiting:
            raise ProblemError(
                409,
                "Rotation in progress",
                f"members {', '.join(waiting)} of gateway {gateway.id} have not received key "
                f"version {r.key_version} yet; bring them online or revoke them, then rotate "
                "again",
            )
    if key_version != gateway.key_version + 1:
        raise ProblemError(
            409,
            "Key version conflict",
            f"gateway {gateway.id} is at key version {gateway.key_version}; a rotation must "
            f"announce version {gateway.key_version + 1} (fetch the key again)",
        )
    if public_key == gateway.hpke_public_key:
        raise ProblemError(422, "Invalid request", "hpke_public_key: that is the current key")


# ----------------------------------------------------------------------- driving


@dataclass
class _Outcome:
    resealed: int = 0
    unopenable: dict[str, str] = field(default_factory=dict)
    blocked: str | None = None


async def advance(app_state: Any, gateway_id: str) -> tuple[bool, dict[str, Any]]:
    """Drive the gateway's rotation as far as it goes now; (complete, status)."""
    async with _registry(app_state).lock(gateway_id):
        return await _advance_locked(app_state, gateway_id)


async def _load(app_state: Any, gateway_id: str) -> tuple[Gateway, KeyRecord, list[str]]:
    async with app_state.db() as session:
        gateway = await session.get(Gateway, gateway_id)
        if gateway is None:
            raise ProblemError(404, "Not Found", f"no gateway {gateway_id}")
        active = await clusters.active_member_ids(session, gateway_id)
        return gateway, KeyRecord.load(gateway.wrapped_private_key), active


async def _update(app_state: Any, gateway_id: str, change: Callable[[KeyRecord], None]) -> None:
    async with app_state.db() as session:
        gateway = await clusters.lock_gateway(session, gateway_id)
        record = KeyRecord.load(gateway.wrapped_private_key)
        change(record)
        gateway.wrapped_private_key = record.dump()
        await session.commit()


async def _advance_locked(app_state: Any, gateway_id: str) -> tuple[bool, dict[str, Any]]:
    hub: Hub = app_state.hub
    gateway, record, active = await _load(app_state, gateway_id)
    r = record.rotation
    result: dict[str, Any] = {"gateway_id": gateway_id, "gateway_key_version": gateway.key_version}
    if r is None:
        return True, result | {"rotation": None}
    lives = [
        live
        for live in hub.members(gateway_id)
        if _reachable(live) and live.member_id not in r.confirmed
    ]
    confirmed, refused = await _deliver(gateway_id, r, lives)
    if refused and r.phase == "delivering" and not r.confirmed and not confirmed:
        await _update(app_state, gateway_id, _abandon)
        detail = "; ".join(f"{m}: {why}" for m, why in refused.items())
        log.warning("rotation.refused", gateway_id=gateway_id, detail=detail)
        raise ProblemError(
            422,
            "Rotation refused",
            f"members refused the new key, so nothing was changed: {detail}",
        )
    if confirmed or refused:

        def note(rec: KeyRecord) -> None:
            if rec.rotation is not None:
                rec.rotation.confirmed += [m for m in confirmed if m not in rec.rotation.confirmed]
                rec.rotation.refused.update(refused)

        await _update(app_state, gateway_id, note)
        r.confirmed += confirmed
        r.refused.update(refused)

    outcome = _Outcome()
    if r.phase == "delivering":
        if not r.confirmed:
            outcome.blocked = "no member is online to take the new key"
        else:
            outcome = await _reseal_all(app_state, gateway_id, r.key_version, set(r.confirmed))
        if outcome.blocked is None:
            await _complete(app_state, gateway_id, r)
    if r.phase == "complete" and all(m in r.confirmed for m in active):
        await _update(app_state, gateway_id, _forget_transport)
        log.info("rotation.every_member_confirmed", gateway_id=gateway_id)
    gateway, record, active = await _load(app_state, gateway_id)
    complete = r.phase == "complete"
    result.update(
        gateway_key_version=gateway.key_version,
        key_version=r.key_version,
        phase=r.phase,
        resealed=outcome.resealed,
        unopenable=outcome.unopenable,
        waiting_for=outcome.blocked,
        confirmed=[m for m in active if m in r.confirmed],
        pending=[m for m in active if m not in r.confirmed],
        refused=r.refused,
    )
    return complete, result


def _abandon(record: KeyRecord) -> None:
    if record.rotation is not None and record.rotation.phase == "delivering":
        record.rotation = None


def _forget_transport(record: KeyRecord) -> None:
    if record.rotation is not None and record.rotation.phase == "complete":
        record.rotation = None


async def _deliver(
    gateway_id: str, r: Rotation, lives: list[LiveTunnel]
) -> tuple[list[str], dict[str, str]]:
    """Hand the new key to ``lives``: (confirmed member ids, {refusing member: reason})."""
    head = {
        "op": "gateway-key",
        "from_version": r.from_version,
        "key_version": r.key_version,
        "public_key": r.hpke_public_key,
        "transport": r.transport,
    }
    results = await asyncio.gather(*(_op(live, head) for live in lives), return_exceptions=True)
    confirmed: list[str] = []
    refused: dict[str, str] = {}
    for live, result in zip(lives, results, strict=True):
        if isinstance(result, _OpFailed):
            if result.permanent:
                refused[live.member_id] = result.reason
            log.warning(
                "rotation.delivery_failed",
                gateway_id=gateway_id,
                member_id=live.member_id,
                reason=result.reason,
            )
        elif isinstance(result, BaseException):
            log.error("rotation.delivery_crashed", member_id=live.member_id, error=repr(result))
        elif result.get("key_version") == r.key_version and (
            result.get("public_key") == r.hpke_public_key
        ):
            confirmed.append(live.member_id)
            log.info("rotation.key_delivered", gateway_id=gateway_id, member_id=live.member_id)
        else:
            refused[live.member_id] = "the member confirmed another key"
    return confirmed, refused


async def _reseal_all(
    app_state: Any, gateway_id: str, to_version: int, holders: set[str] | None
) -> _Outcome:
    """Re-seal every connection below ``to_version`` through members in ``holders`` (None:
    any connected member)."""
    hub: Hub = app_state.hub
    outcome = _Outcome()
    turn = itertools.count()
    gate = asyncio.Semaphore(_RESEAL_PARALLEL)

    async def one(connection: clusters.SealedConnection) -> None:
        async with gate:
            if outcome.blocked:
                return
            members = [
                live
                for live in hub.members(gateway_id)
                if _reachable(live) and (holders is None or live.member_id in holders)
            ]
            if not members:
                outcome.blocked = "no member holding the new key is online"
                return
            start_at = next(turn)
            reasons: list[_OpFailed] = []
            for i in range(len(members)):
                live = members[(start_at + i) % len(members)]
                try:
                    answer = await _op(live, _reseal_head(connection, to_version))
                    suite, blob = _check_resealed(answer, to_version)
                except _OpFailed as exc:
                    reasons.append(exc)
                    if exc.permanent:
                        break
                    continue
                async with app_state.db() as session:
                    swapped = await clusters.swap_sealed(
                        session, connection, suite, blob, to_version
                    )
                    await session.commit()
                if swapped:
                    outcome.resealed += 1
                return
            last = reasons[-1]
            if last.permanent or all(e.code is ErrorCode.REFUSED_STREAM for e in reasons):
                outcome.unopenable[connection.id] = last.reason
                log.warning(
                    "rotation.reseal_failed", connection_id=connection.id, reason=last.reason
                )
            else:
                outcome.blocked = f"re-sealing {connection.id} failed: {last.reason}"

    for _ in range(_RESEAL_PASSES):
        async with app_state.db() as session:
            batch = await clusters.connections_below(session, gateway_id, to_version)
        batch = [c for c in batch if c.id not in outcome.unopenable]
        if not batch or outcome.blocked:
            break
        await asyncio.gather(*(one(c) for c in batch))
    else:
        outcome.blocked = outcome.blocked or "connections kept changing during the re-seal"
    if outcome.resealed:
        log.info("rotation.resealed", gateway_id=gateway_id, connections=outcome.resealed)
    return outcome


def _reseal_head(connection: clusters.SealedConnection, to_version: int) -> dict[str, Any]:
    return {
        "op": "reseal",
        "connection_id": connection.id,
        "base_url": connection.base_url,
        "suite": connection.seal_suite,
        "sealed": b64e(connection.sealed_credentials),
        "from_version": connection.key_version,
        "to_version": to_version,
    }


def _check_resealed(answer: dict[str, Any], to_version: int) -> tuple[str, bytes]:
    suite, sealed = answer.get("suite"), answer.get("sealed")
    if answer.get("key_version") != to_version or not isinstance(suite, str):
        raise _OpFailed("the member re-sealed to another key version", permanent=True)
    try:
        blob = b64d(sealed) if isinstance(sealed, str) else b""
    except ValueError:
        blob = b""
    if not blob or len(suite) > 64:
        raise _OpFailed("the member's re-sealed blob is malformed", permanent=True)
    return suite, blob


async def _complete(app_state: Any, gateway_id: str, r: Rotation) -> None:
    now = utcnow()
    async with app_state.db() as session:
        gateway = await clusters.lock_gateway(session, gateway_id)
        record = KeyRecord.load(gateway.wrapped_private_key)
        pending = record.rotation
        if pending is None or pending.key_version != r.key_version:
            return
        gateway.hpke_public_key = pending.hpke_public_key
        gateway.key_version = pending.key_version
        record.wrapped = pending.wrapped
        pending.wrapped = None
        pending.phase = "complete"
        pending.completed_at = now.isoformat()
        record.retire_after = (now + dt.timedelta(seconds=RETIRE_GRACE_SECONDS)).isoformat()
        gateway.wrapped_private_key = record.dump()
        await session.commit()
    r.phase = "complete"
    r.completed_at = now.isoformat()
    log.info("rotation.complete", gateway_id=gateway_id, key_version=r.key_version)
    _registry(app_state).tasks.spawn(
        _retire_later(app_state, gateway_id, r.key_version), f"retire-{gateway_id}"
    )


# ----------------------------------------------------------------------- retiring


async def _retire_later(app_state: Any, gateway_id: str, key_version: int) -> None:
    await asyncio.sleep(RETIRE_GRACE_SECONDS)
    async with _registry(app_state).lock(gateway_id):
        await _retire(app_state, gateway_id, key_version)


async def _retire(app_state: Any, gateway_id: str, key_version: int) -> None:
    """Re-seal stragglers (connections created while the rotation finished), then tell every
    connected member to drop keys below ``key_version``."""
    gateway, _, _ = await _load(app_state, gateway_id)
    if gateway.key_version != key_version:
        return
    outcome = await _reseal_all(app_state, gateway_id, key_version, None)
    if outcome.blocked:
        log.warning("rotation.retire_postponed", gateway_id=gateway_id, reason=outcome.blocked)
        return
    hub: Hub = app_state.hub
    lives = [live for live in hub.members(gateway_id) if _reachable(live)]
    await asyncio.gather(*(_retire_on(live, key_version) for live in lives), return_exceptions=True)


async def _retire_on(live: LiveTunnel, key_version: int) -> None:
    try:
        answer = await _op(live, {"op": "retire-keys", "keep_from": key_version})
    except _OpFailed as exc:
        log.info("rotation.retire_failed", member_id=live.member_id, reason=exc.reason)
        return
    if answer.get("retired"):
        log.info("rotation.retired", member_id=live.member_id, retired=answer["retired"])


# ----------------------------------------------------------------------- members coming online


async def after_handshake(app_state: Any, live: LiveTunnel) -> None:
    """Called by the tunnel endpoint once a member is registered (before its tunnel runs).

    Returns at once: the work (handing over a key the member missed, resuming a rotation
    that waited for a member, telling it to retire old keys) needs the tunnel running.
    """
    _registry(app_state).tasks.spawn(_member_online(app_state, live), f"online-{live.member_id}")


async def _member_online(app_state: Any, live: LiveTunnel) -> None:
    try:
        gateway, record, _ = await _load(app_state, live.gateway_id)
        r = record.rotation
        if r is not None and live.member_id not in r.confirmed:
            await advance(app_state, live.gateway_id)
        elif record.retire_after is not None and utcnow().isoformat() >= record.retire_after:
            async with app_state.db() as session:
                older = await clusters.connections_below(
                    session, live.gateway_id, gateway.key_version, limit=1
                )
            if not older:
                await _retire_on(live, gateway.key_version)
    except ProblemError as exc:
        log.warning("rotation.resume_failed", gateway_id=live.gateway_id, reason=exc.detail)
    except Exception:
        log.exception("rotation.resume_crashed", gateway_id=live.gateway_id)
