"""Enrollment: turn a one-time token into a member identity and a config directory.

Steps, in this order so a failure leaves nothing half-made:

1. connect to the relay over TLS, verifying with the given CA file (or the system CAs), and
   pin the SHA-256 fingerprint of the certificate it presents; later connections can trust the
   pin even if the CA is replaced;
2. ``POST /v1/enroll/prepare`` with the token: the relay checks it *without using it up* and
   names the gateway, its public key and its wrapped private key, if it has them;
3. the gateway key: the first member generates the gateway's HPKE key pair and wraps the
   private key under the recovery key (:mod:`backhaul.recovery`; one is generated when none
   is given, and returned so the CLI prints it once); a joining member (``--join``) unwraps
   the relay's copy with the recovery key instead, and checks it against the public key. A
   wrong recovery key stops here: nothing written, token still valid;
4. generate the member's Ed25519 signing key and write both keys mode 0600 under ``keys/``
   (the gateway key as a :class:`~agent.keyring.Keyring`, versioned);
5. ``POST /v1/enroll`` with the token and the public keys (and the wrapped key, for the first
   member); the relay answers 201 with the member and gateway ids, or an RFC 9457 problem
   document whose ``detail`` is shown as is. On any failure the keys just written are deleted;
6. write ``agent.toml`` with the ids, the pin, the CA (copied next to it as ``relay-ca.pem``)
   and one ``prefix`` allow entry per ``--allow``; ``--target-ca-file`` (the internal CA that
   HTTPS targets are checked against) is copied as ``target-ca.pem`` and set as
   ``[upstream] ca_file``, so that trust decision stays on the agent.

The token is sent twice (prepare, enroll) and written nowhere; the recovery key is sent
nowhere and written nowhere.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from agent.config import CONFIG_FILE, AgentConfig, config_from_dict, is_loopback, save_config
from agent.errors import EnrollError
from agent.keyring import Keyring
from agent.policy import AllowEntry
from agent.proxy import sync_transport
from backhaul import recovery
from backhaul.errors import SealError
from backhaul.keys import (
    fingerprint,
    generate_signing_key,
    public_key_text,
    save_signing_key,
)
from backhaul.seal import GatewayKeyPair
from backhaul.version import __version__

__all__ = ["CA_COPY_NAME", "TARGET_CA_COPY_NAME", "EnrollResult", "enroll", "peer_certificate"]

CA_COPY_NAME = "relay-ca.pem"
TARGET_CA_COPY_NAME = "target-ca.pem"
_TIMEOUT = 15.0
#: Members per gateway; the relay enforces it, the agent checks early for a clearer message.
MAX_MEMBERS = 10


@dataclass(frozen=True)
class EnrollResult:
    member_id: str
    gateway_id: str
    gateway_name: str
    config_file: Path
    pinned_fingerprint: str | None
    key_version: int = 1
    joined: bool = False
    #: A recovery key generated for this (first) member: print it once, store it nowhere.
    recovery_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Prepared:
    gateway_id: str
    gateway_name: str
    hpke_public_key: str | None
    wrapped_private_key: dict[str, Any] | None
    key_version: int
    members: int


def _check_ca_file(path: Path, option: str) -> None:
    """The file exists and holds at least one PEM certificate a TLS context accepts."""
    if not path.is_file():
        raise EnrollError(f"{option} {path} does not exist")
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise EnrollError(f"{option} {path} is not a PEM CA certificate: {exc}") from None


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"cannot use CA file {ca_file}: {exc}") from None


def peer_certificate(host: str, port: int, ctx: ssl.SSLContext) -> bytes:
    """The DER certificate the relay presents, after normal verification against ``ctx``."""
    try:
        with (
            socket.create_connection((host, port), timeout=_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise EnrollError(
            f"the relay's certificate at {host}:{port} is not trusted ({exc.verify_message}); "
            "pass the relay's CA with --ca-file"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"cannot open a TLS connection to {host}:{port}: {exc}") from None
    if not der:
        raise EnrollError(f"the relay at {host}:{port} presented no certificate")
    return der


def _already_enrolled(config_dir: Path) -> bool:
    path = config_dir / CONFIG_FILE
    if not path.exists():
        return False
    try:
        return "member_id" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True


def _problem_detail(response: httpx.Response) -> str:
    try:
        doc: Any = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        detail = doc.get("detail") or doc.get("title")
        if isinstance(detail, str) and detail:
            return detail
    return response.reason_phrase or f"HTTP {response.status_code}"


def enroll(
    relay_url: str,
    token: str,
    config_dir: Path,
    *,
    ca_file: Path | None = None,
    allow: Sequence[str] = (),
    name: str | None = None,
    dev: bool = False,
    force: bool = False,
    join: bool = False,
    target_ca_file: Path | None = None,
    recovery_key: str | None = None,
) -> EnrollResult:
    """Enroll this machine as a member of the gateway the token belongs to.

    The first member creates the gateway key (``join=False``); further members join with the
    admin's recovery key (``join=True``).
    """
    config_dir = config_dir.expanduser().absolute()
    parts = urlsplit(relay_url.rstrip("/"))
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise EnrollError(f"--relay must be an https:// URL, not {relay_url!r}")
    if parts.scheme == "http" and not (dev and is_loopback(host)):
        raise EnrollError("--relay http:// is allowed only with --dev and a loopback relay")
    if not token.strip():
        raise EnrollError("--token is empty")
    try:
        entries = [AllowEntry(prefix=prefix) for prefix in allow]
    except ValidationError as exc:
        first = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise EnrollError(f"--allow: {first}") from None
    if ca_file is not None and not ca_file.is_file():
        raise EnrollError(f"--ca-file {ca_file} does not exist")
    if target_ca_file is not None:
        _check_ca_file(target_ca_file, "--target-ca-file")
    if _already_enrolled(config_dir) and not force:
        raise EnrollError(
            f"{config_dir / CONFIG_FILE} already holds an enrolled member; "
            "pass --force to replace it (the old member must then be removed on the relay)"
        )
    member_name = name or socket.gethostname()
    secret: recovery.RecoveryKey | None = None
    if recovery_key is not None:
        try:
            secret = recovery.parse(recovery_key)
        except recovery.RecoveryKeyError as exc:
            raise EnrollError(f"--recovery-key: {exc}") from None
    if join and secret is None:
        raise EnrollError(
            "--join needs --recovery-key: the key printed when the gateway's first member enrolled"
        )

    ctx: ssl.SSLContext | None = None
    pin: str | None = None
    if parts.scheme == "https":
        ctx = _tls_context(ca_file)
        pin = fingerprint(peer_certificate(host, parts.port or 443, ctx))

    base = relay_url.rstrip("/")
    prepared = _prepare(base, token, ctx, pin)
    generated: str | None = None
    wrapped: dict[str, Any] | None = None
    if join:
        assert secret is not None
        gateway_key = _unwrap_for_join(prepared, secret)
    else:
        if prepared.hpke_public_key is not None:
            raise EnrollError(
                f"gateway {prepared.gateway_name} ({prepared.gateway_id}) already has a key "
                "and members; add this machine with --join --recovery-key KEY"
            )
        gateway_key = GatewayKeyPair.generate()
        if secret is None:
            secret, generated = recovery.generate()
        wrapped = recovery.wrap(
            secret, gateway_key.to_bytes(), prepared.gateway_id, prepared.key_version
        )
    del secret

    signing_key = generate_signing_key()
    signing_path = config_dir / "keys" / "member.key"
    gateway_path = config_dir / "keys" / "gateway.key"
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (config_dir / "keys").mkdir(exist_ok=True, mode=0o700)
    stale = [p for p in (config_dir / "keys").glob("gateway.*.key") if p != gateway_path]
    for path in stale:  # versions of a previous enrollment (--force)
        path.unlink()
    save_signing_key(signing_path, signing_key)
    keyring = Keyring.create(gateway_path, gateway_key, prepared.key_version)
    written = [signing_path, gateway_path, keyring.version_path(prepared.key_version)]

    try:
        body: dict[str, Any] = {
            "token": token,
            "name": member_name,
            "hostname": socket.gethostname(),
            "version": __version__,
            "signing_public_key": public_key_text(signing_key),
            "hpke_public_key": gateway_key.public_text(),
            "join": join,
            "key_version": prepared.key_version,
        }
        if wrapped is not None:
            body["wrapped_private_key"] = wrapped
        answer = _post_enroll(base, body, ctx, pin)
        ca_copy: Path | None = None
        if ca_file is not None:
            ca_copy = config_dir / CA_COPY_NAME
            if ca_file.absolute() != ca_copy:
                shutil.copyfile(ca_file, ca_copy)
        target_copy: Path | None = None
        if target_ca_file is not None:
            target_copy = config_dir / TARGET_CA_COPY_NAME
            if target_ca_file.absolute() != target_copy:
                shutil.copyfile(target_ca_file, target_copy)
        cfg: AgentConfig = config_from_dict(
            {
                "relay_url": relay_url.rstrip("/"),
                "member_id": answer["member_id"],
                "gateway_id": answer["gateway_id"],
                "name": member_name,
                "dev": dev,
                "allow": [e.model_dump(exclude_none=True) for e in entries],
                **({"ca_file": str(ca_copy)} if ca_copy else {}),
                **({"pinned_fingerprint": pin} if pin else {}),
                **({"upstream": {"ca_file": str(target_copy)}} if target_copy else {}),
            },
            config_dir,
            origin="enrollment",
        )
        save_config(cfg.config_file, cfg)
    except BaseException:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    return EnrollResult(
        member_id=cfg.member_id,
        gateway_id=cfg.gateway_id,
        gateway_name=answer["gateway_name"],
        config_file=cfg.config_file,
        pinned_fingerprint=pin,
        key_version=prepared.key_version,
        joined=join,
        recovery_key=generated,
    )


def _unwrap_for_join(prepared: _Prepared, secret: recovery.RecoveryKey) -> GatewayKeyPair:
    """The gateway private key from the relay's wrapped copy, checked against the public key."""
    where = f"gateway {prepared.gateway_name} ({prepared.gateway_id})"
    if prepared.hpke_public_key is None:
        raise EnrollError(f"{where} has no member yet: enroll the first member without --join")
    if prepared.wrapped_private_key is None:
        raise EnrollError(
            f"the relay holds no recovery-wrapped key for {where} (its first member was "
            "enrolled without one), so no member can join it"
        )
    if prepared.members >= MAX_MEMBERS:
        raise EnrollError(f"{where} already has {prepared.members} members, the maximum")
    try:
        raw = recovery.unwrap(
            secret, prepared.wrapped_private_key, prepared.gateway_id, prepared.key_version
        )
        key = GatewayKeyPair.from_bytes(raw)
    except recovery.RecoveryKeyError as exc:
        raise EnrollError(
            f"{exc} for {where}; nothing was written and the enrollment token is still valid"
        ) from None
    except SealError:
        raise EnrollError(f"the wrapped key of {where} is not a gateway key") from None
    if key.public_text() != prepared.hpke_public_key:
        raise EnrollError(
            f"the relay's wrapped key for {where} does not match the gateway's public key; "
            "refusing to join"
        )
    return key


def _prepare(base: str, token: str, ctx: ssl.SSLContext | None, pin: str | None) -> _Prepared:
    status, doc = _post_json(base, "/v1/enroll/prepare", {"token": token}, ctx, pin)
    if status != 200:
        raise EnrollError(f"the relay refused enrollment ({status}): {doc}")
    if not isinstance(doc, dict):
        raise EnrollError("the relay's enrollment answer is malformed")
    try:
        prepared = _Prepared(
            gateway_id=doc["gateway_id"],
            gateway_name=doc["gateway_name"],
            hpke_public_key=doc.get("hpke_public_key"),
            wrapped_private_key=doc.get("wrapped_private_key"),
            key_version=doc.get("key_version", 1),
            members=doc.get("members", 0),
        )
    except KeyError:
        raise EnrollError("the relay's enrollment answer is malformed") from None
    if not (
        isinstance(prepared.gateway_id, str)
        and prepared.gateway_id
        and isinstance(prepared.gateway_name, str)
        and isinstance(prepared.hpke_public_key, str | None)
        and isinstance(prepared.wrapped_private_key, dict | None)
        and isinstance(prepared.key_version, int)
        and prepared.key_version >= 1
        and isinstance(prepared.members, int)
    ):
        raise EnrollError("the relay's enrollment answer is malformed")
    return prepared


def _post_json(
    base: str, path: str, body: dict[str, Any], ctx: ssl.SSLContext | None, pin: str | None
) -> tuple[int, Any]:
    """POST ``body``; (status, decoded JSON) on 2xx, (status, problem detail) otherwise."""
    try:
        with (
            httpx.Client(
                verify=ctx if ctx is not None else True,
                timeout=_TIMEOUT,
                trust_env=False,
                transport=sync_transport(base, ctx if ctx is not None else True),  # HTTPS_PROXY
            ) as client,
            client.stream(
                "POST", base + path, json=body, headers={"accept": "application/json"}
            ) as resp,
        ):
            if pin is not None:
                _check_pin(resp, pin)
            resp.read()
    except httpx.HTTPError as exc:
        raise EnrollError(f"cannot reach the relay at {base}: {exc}") from None
    if not 200 <= resp.status_code < 300:
        return resp.status_code, _problem_detail(resp)
    try:
        return resp.status_code, json.loads(resp.content)
    except ValueError:
        raise EnrollError("the relay's enrollment answer is malformed") from None


def _post_enroll(
    base: str, body: dict[str, Any], ctx: ssl.SSLContext | None, pin: str | None
) -> dict[str, str]:
    status, doc = _post_json(base, "/v1/enroll", body, ctx, pin)
    if status != 201:
        raise EnrollError(f"the relay refused enrollment ({status}): {doc}")
    try:
        answer = {k: doc[k] for k in ("member_id", "gateway_id", "gateway_name")}
    except (KeyError, TypeError):
        raise EnrollError("the relay's enrollment answer is malformed") from None
    if not all(isinstance(v, str) and v for v in answer.values()):
        raise EnrollError("the relay's enrollment answer is malformed")
    return answer


def _check_pin(resp: httpx.Response, pin: str) -> None:
    """The POST must reach the same certificate that was pinned a moment before."""
    stream = resp.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if ssl_object is None:
        return
    der = ssl_object.getpeercert(True)
    if der is not None and fingerprint(der) != pin:
        raise EnrollError("the relay's certificate changed during enrollment; try again")
