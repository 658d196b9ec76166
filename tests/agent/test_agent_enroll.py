from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from agent.cli import app
from agent.config import load_config
from agent.enroll import enroll
from agent.errors import EnrollError
from backhaul.keys import b64d, fingerprint, load_signing_key, public_key_text, read_private
from backhaul.seal import GatewayKeyPair, open_sealed, seal

TOKEN = "bhe_enrolltoken_0123456789abcdef"


@dataclass
class FakeRelay:
    url: str
    ca_pem: Path
    leaf_der: bytes
    received: list[dict[str, Any]] = field(default_factory=list)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


class _Handler(BaseHTTPRequestHandler):
    relay: FakeRelay

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        body = json.loads(self.rfile.read(length))
        self.relay.received.append(body)
        if self.path != "/v1/enroll":
            self._send(404, {"title": "Not Found"}, "application/problem+json")
        elif body.get("token") == TOKEN:
            self._send(
                201,
                {"member_id": "mbr_abc", "gateway_id": "gw_xyz", "gateway_name": "plant-7"},
                "application/json",
            )
        else:
            self._send(
                401,
                {
                    "type": "about:blank",
                    "title": "Unauthorized",
                    "status": 401,
                    "detail": "enrollment token is invalid or has expired",
                },
                "application/problem+json",
            )

    def _send(self, status: int, doc: dict[str, Any], ctype: str) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeRelay]:
    base = tmp_path_factory.mktemp("relay")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Test Relay CA", ca_key, None, ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("localhost", leaf_key, ca.subject, ca_key, ca=False)
    ca_pem = base / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (base / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (base / "leaf.key").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(base / "leaf.pem", base / "leaf.key")

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    fake = FakeRelay(
        url=f"https://127.0.0.1:{port}",
        ca_pem=ca_pem,
        leaf_der=leaf.public_bytes(serialization.Encoding.DER),
    )
    _Handler.relay = fake
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def _all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


def test_enroll_writes_keys_config_and_pin(relay: FakeRelay, tmp_path: Path) -> None:
    config_dir = tmp_path / "agent"
    result = enroll(
        relay.url + "/",
        TOKEN,
        config_dir,
        ca_file=relay.ca_pem,
        allow=["https://api.internal:8443/v1/", "http://10.0.0.5/"],
        name="edge-1",
    )
    assert result.member_id == "mbr_abc"
    assert result.gateway_name == "plant-7"
    assert result.pinned_fingerprint == fingerprint(relay.leaf_der)

    for name in ("keys/member.key", "keys/gateway.key", "agent.toml"):
        mode = stat.S_IMODE(os.stat(config_dir / name).st_mode)
        assert mode & 0o077 == 0, (name, oct(mode))
    assert stat.S_IMODE(os.stat(config_dir / "keys").st_mode) == 0o700

    cfg = load_config(config_dir, environ={})
    assert cfg.relay_url == relay.url
    assert cfg.member_id == "mbr_abc" and cfg.gateway_id == "gw_xyz" and cfg.name == "edge-1"
    assert cfg.pinned_fingerprint == fingerprint(relay.leaf_der)
    assert cfg.ca_file == config_dir / "relay-ca.pem"
    assert cfg.ca_file.is_absolute()
    assert cfg.ca_file.read_bytes() == relay.ca_pem.read_bytes()
    assert [e.prefix for e in cfg.allow] == ["https://api.internal:8443/v1/", "http://10.0.0.5:80/"]

    sent = relay.received[-1]
    assert sent["token"] == TOKEN
    assert sent["name"] == "edge-1"
    assert sent["hostname"] and sent["version"]
    signing = load_signing_key(cfg.signing_key_file)
    assert sent["signing_public_key"] == public_key_text(signing)
    gateway = GatewayKeyPair.from_bytes(b64d(read_private(cfg.gateway_key_file).decode().strip()))
    assert sent["hpke_public_key"] == gateway.public_text()
    # The relay can seal to the key it was given, and only this agent opens it.
    suite, blob = seal(sent["hpke_public_key"], "cxn_1", "https://api/", {"api_key": "k"})
    assert open_sealed(gateway, suite, blob, "cxn_1", "https://api/") == {"api_key": "k"}

    assert TOKEN.encode() not in _all_bytes(config_dir)
    assert b"enrolltoken" not in _all_bytes(config_dir)


def test_refused_token_leaves_nothing(relay: FakeRelay, tmp_path: Path) -> None:
    config_dir = tmp_path / "agent"
    with pytest.raises(EnrollError, match="token is invalid or has expired") as info:
        enroll(relay.url, "bhe_wrong", config_dir, ca_file=relay.ca_pem)
    assert "401" in str(info.value)
    assert not (config_dir / "keys" / "member.key").exists()
    assert not (config_dir / "keys" / "gateway.key").exists()
    assert not (config_dir / "agent.toml").exists()


def test_refuses_to_overwrite_without_force(relay: FakeRelay, tmp_path: Path) -> None:
    config_dir = tmp_path / "agent"
    enroll(relay.url, TOKEN, config_dir, ca_file=relay.ca_pem)
    before = (config_dir / "keys" / "member.key").read_bytes()
    with pytest.raises(EnrollError, match="--force"):
        enroll(relay.url, TOKEN, config_dir, ca_file=relay.ca_pem)
    assert (config_dir / "keys" / "member.key").read_bytes() == before
    enroll(relay.url, TOKEN, config_dir, ca_file=relay.ca_pem, force=True)
    assert (config_dir / "keys" / "member.key").read_bytes() != before


def test_untrusted_relay_certificate(relay: FakeRelay, tmp_path: Path) -> None:
    with pytest.raises(EnrollError, match=r"not trusted.*--ca-file"):
        enroll(relay.url, TOKEN, tmp_path / "agent")
    assert not (tmp_path / "agent" / "keys").exists()


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("http://relay.example.com", {}, "--dev"),
        ("http://relay.example.com", {"dev": True}, "loopback"),
        ("relay.example.com", {}, "https://"),
        ("https://127.0.0.1:1", {"allow": ["ftp://x/"]}, "--allow"),
        ("https://127.0.0.1:1", {"ca_file": Path("/nonexistent.pem")}, "does not exist"),
    ],
)
def test_bad_arguments(tmp_path: Path, url: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(EnrollError, match=message):
        enroll(url, TOKEN, tmp_path / "agent", **kwargs)
    assert not (tmp_path / "agent").exists()


def test_unreachable_relay(tmp_path: Path, closed_port: int) -> None:
    with pytest.raises(EnrollError, match="cannot open a TLS connection"):
        enroll(f"https://127.0.0.1:{closed_port}", TOKEN, tmp_path / "agent")


def test_cli_enroll(relay: FakeRelay, tmp_path: Path) -> None:
    config_dir = tmp_path / "agent"
    runner = CliRunner()
    args = [
        "enroll",
        "--relay",
        relay.url,
        "--token",
        TOKEN,
        "--ca-file",
        str(relay.ca_pem),
        "--config-dir",
        str(config_dir),
        "--allow",
        "https://api.internal/v1/",
        "--name",
        "edge-2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mbr_abc" in result.stdout
    assert "plant-7" in result.stdout
    assert f"backhaul-agent run --config-dir {config_dir}" in result.stdout
    assert TOKEN not in result.output

    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "--force" in result.stderr
    assert "Traceback" not in result.output

    bad = [*args, "--force"]
    bad[bad.index(TOKEN)] = "bhe_nope"
    result = runner.invoke(app, bad)
    assert result.exit_code == 1
    assert "token is invalid or has expired" in result.stderr
