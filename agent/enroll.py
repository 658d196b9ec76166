"""Enrollment: turn a one-time token into a member identity and a config directory.

Steps, in this order so a failure leaves nothing half-made:

1. connect to the relay over TLS, verifying with the given CA file (or the system CAs), and
   pin the SHA-256 fingerprint of the certificate it presents; later connections can trust the
   pin even if the CA is replaced;
2. generate the member's Ed25519 signing key and the gateway's HPKE key pair and write them
   mode 0600 under ``keys/``;
3. ``POST /v1/enroll`` with the token and the two public keys; the relay answers 201 with the
   member and gateway ids, or an RFC 9457 problem document whose ``detail`` is shown as is. On
   any failure the keys just written are deleted;
4. write ``agent.toml`` with the ids, the pin, the CA (copied next to it as ``relay-ca.pem``)
   and one ``prefix`` allow entry per ``--allow``.

The token is sent once and written nowhere.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from agent.config import CONFIG_FILE, AgentConfig, config_from_dict, is_loopback, save_config
from agent.errors import EnrollError
from agent.policy import AllowEntry
from backhaul.keys import (
    b64e,
    fingerprint,
    generate_signing_key,
    public_key_text,
    save_signing_key,
    write_private,
)
from backhaul.seal import GatewayKeyPair
from backhaul.version import __version__

__all__ = ["CA_COPY_NAME", "EnrollResult", "enroll", "peer_certificate"]

CA_COPY_NAME = "relay-ca.pem"
_TIMEOUT = 15.0


@dataclass(frozen=True)
class EnrollResult:
    member_id: str
    gateway_id: str
    gateway_name: str
    config_file: Path
    pinned_fingerprint: str | None


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
) -> EnrollResult:
    """Enroll this machine as a member of the gateway the token belongs to."""
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
    if _already_enrolled(config_dir) and not force:
        raise EnrollError(
            f"{config_dir / CONFIG_FILE} already holds an enrolled member; "
            "pass --force to replace it (the old member must then be removed on the relay)"
        )
    member_name = name or socket.gethostname()

    ctx: ssl.SSLContext | None = None
    pin: str | None = None
    if parts.scheme == "https":
        ctx = _tls_context(ca_file)
        pin = fingerprint(peer_certificate(host, parts.port or 443, ctx))

    signing_key = generate_signing_key()
    gateway_key = GatewayKeyPair.generate()
    signing_path = config_dir / "keys" / "member.key"
    gateway_path = config_dir / "keys" / "gateway.key"
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (config_dir / "keys").mkdir(exist_ok=True, mode=0o700)
    save_signing_key(signing_path, signing_key)
    write_private(gateway_path, (b64e(gateway_key.to_bytes()) + "\n").encode("ascii"))

    try:
        answer = _post_enroll(
            relay_url.rstrip("/"),
            {
                "token": token,
                "name": member_name,
                "hostname": socket.gethostname(),
                "version": __version__,
                "signing_public_key": public_key_text(signing_key),
                "hpke_public_key": gateway_key.public_text(),
            },
            ctx,
            pin,
        )
        ca_copy: Path | None = None
        if ca_file is not None:
            ca_copy = config_dir / CA_COPY_NAME
            if ca_file.absolute() != ca_copy:
                shutil.copyfile(ca_file, ca_copy)
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
            },
            config_dir,
            origin="enrollment",
        )
        save_config(cfg.config_file, cfg)
    except BaseException:
        for path in (signing_path, gateway_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    return EnrollResult(
        member_id=cfg.member_id,
        gateway_id=cfg.gateway_id,
        gateway_name=answer["gateway_name"],
        config_file=cfg.config_file,
        pinned_fingerprint=pin,
    )


def _post_enroll(
    relay_url: str, body: dict[str, str], ctx: ssl.SSLContext | None, pin: str | None
) -> dict[str, str]:
    url = relay_url + "/v1/enroll"
    try:
        with (
            httpx.Client(
                verify=ctx if ctx is not None else True, timeout=_TIMEOUT, trust_env=False
            ) as client,
            client.stream("POST", url, json=body, headers={"accept": "application/json"}) as resp,
        ):
            if pin is not None:
                _check_pin(resp, pin)
            resp.read()
    except httpx.HTTPError as exc:
        raise EnrollError(f"cannot reach the relay at {relay_url}: {exc}") from None
    if resp.status_code != 201:
        detail = _problem_detail(resp)
        raise EnrollError(f"the relay refused enrollment ({resp.status_code}): {detail}")
    try:
        doc = json.loads(resp.content)
        answer = {k: doc[k] for k in ("member_id", "gateway_id", "gateway_name")}
    except (ValueError, KeyError, TypeError):
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
