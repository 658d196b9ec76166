from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
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
from agent.keyring import Keyring
from backhaul import recovery
from backhaul.keys import b64d, fingerprint, load_signing_key, public_key_text, read_private
from backhaul.seal import GatewayKeyPair, open_sealed, seal

TOKEN = "bhe_enrolltoken_0123456789abcdef"


@dataclass
class FakeRelay:
    url: str
    ca_pem: Path
    leaf_der: bytes
    received: list[dict[str, Any]] = field(default_factory=list)
    #: What prepare says about the gateway (a first member's gateway has no key).
    gateway: dict[str, Any] = field(default_factory=dict)


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
        if self.path not in ("/v1/enroll", "/v1/enroll/prepare"):
            self._send(404, {"title": "Not Found"}, "application/problem+json")
        elif body.get("token") == TOKEN and self.path == "/v1/enroll/prepare":
            doc = {
                "gateway_id": "gw_xyz",
                "gateway_name": "plant-7",
                "hpke_public_key": None,
                "wrapped_private_key": None,
                "key_version": 1,
                "members": 0,
            }
            self._send(200, doc | self.relay.gateway, "application/json")
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


# -------------------------------------------------------------------- clusters


@pytest.fixture
def fresh(relay: FakeRelay) -> Iterator[FakeRelay]:
    relay.gateway = {}
    relay.received.clear()
    yield relay
    relay.gateway = {}


def _keyfiles(config_dir: Path) -> list[str]:
    keys = config_dir / "keys"
    return sorted(p.name for p in keys.iterdir()) if keys.exists() else []


def test_first_member_generates_and_returns_a_recovery_key(
    fresh: FakeRelay, tmp_path: Path
) -> None:
    config_dir = tmp_path / "agent"
    result = enroll(fresh.url, TOKEN, config_dir, ca_file=fresh.ca_pem)
    assert result.recovery_key is not None and result.recovery_key.startswith("bhrk_")
    assert result.key_version == 1 and not result.joined
    assert [r.get("join") for r in fresh.received] == [None, False]  # prepare, then enroll
    sent = fresh.received[-1]
    assert _keyfiles(config_dir) == ["gateway.1.key", "gateway.key", "member.key"]
    gateway = Keyring.load(config_dir / "keys" / "gateway.key").get(1)
    assert sent["hpke_public_key"] == gateway.public_text()
    secret = recovery.parse(result.recovery_key)
    assert recovery.unwrap(secret, sent["wrapped_private_key"], "gw_xyz", 1) == (gateway.to_bytes())
    on_disk = _all_bytes(config_dir)
    assert result.recovery_key.encode() not in on_disk
    assert secret.secret not in on_disk
    assert result.recovery_key not in repr(result)


def test_first_member_with_a_given_recovery_key(fresh: FakeRelay, tmp_path: Path) -> None:
    secret, text = recovery.generate()
    result = enroll(fresh.url, TOKEN, tmp_path / "agent", ca_file=fresh.ca_pem, recovery_key=text)
    assert result.recovery_key is None
    wrapped = fresh.received[-1]["wrapped_private_key"]
    gateway = Keyring.load(tmp_path / "agent" / "keys" / "gateway.key").current
    assert recovery.unwrap(secret, wrapped, "gw_xyz", 1) == gateway.to_bytes()


def test_first_member_of_a_gateway_with_a_key_is_told_to_join(
    fresh: FakeRelay, tmp_path: Path
) -> None:
    fresh.gateway = {"hpke_public_key": GatewayKeyPair.generate().public_text(), "members": 1}
    with pytest.raises(EnrollError, match="--join --recovery-key"):
        enroll(fresh.url, TOKEN, tmp_path / "agent", ca_file=fresh.ca_pem)
    assert [r.get("join") for r in fresh.received] == [None]  # the token was never spent
    assert not (tmp_path / "agent").exists()


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    secret, text = recovery.generate()
    key = GatewayKeyPair.generate()
    return {
        "text": text,
        "key": key,
        "gateway": {
            "hpke_public_key": key.public_text(),
            "wrapped_private_key": recovery.wrap(secret, key.to_bytes(), "gw_xyz", 3),
            "key_version": 3,
            "members": 2,
        },
    }


def test_join_unwraps_the_gateway_key(
    fresh: FakeRelay, tmp_path: Path, cluster: dict[str, Any]
) -> None:
    fresh.gateway = cluster["gateway"]
    config_dir = tmp_path / "agent"
    result = enroll(
        fresh.url, TOKEN, config_dir, ca_file=fresh.ca_pem, join=True, recovery_key=cluster["text"]
    )
    assert result.joined and result.key_version == 3 and result.recovery_key is None
    sent = fresh.received[-1]
    assert sent["join"] is True and sent["key_version"] == 3
    assert "wrapped_private_key" not in sent
    assert sent["hpke_public_key"] == cluster["key"].public_text()
    ring = Keyring.load(config_dir / "keys" / "gateway.key")
    assert ring.versions == [3] and ring.current.to_bytes() == cluster["key"].to_bytes()
    assert cluster["text"].encode() not in _all_bytes(config_dir)


def test_join_with_a_wrong_recovery_key_writes_nothing_and_keeps_the_token(
    fresh: FakeRelay, tmp_path: Path, cluster: dict[str, Any]
) -> None:
    fresh.gateway = cluster["gateway"]
    with pytest.raises(EnrollError, match="wrong recovery key") as info:
        enroll(
            fresh.url,
            TOKEN,
            tmp_path / "agent",
            ca_file=fresh.ca_pem,
            join=True,
            recovery_key=recovery.generate()[1],
        )
    assert "token is still valid" in str(info.value)
    assert [r.get("join") for r in fresh.received] == [None]  # prepare only
    assert not (tmp_path / "agent").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"join": True}, "--join needs --recovery-key"),
        ({"join": True, "recovery_key": "bhrk_1234-5678"}, "not a valid recovery key"),
        ({"recovery_key": "short"}, "at least 16"),
    ],
)
def test_recovery_key_mistakes_are_caught_before_any_request(
    fresh: FakeRelay, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(EnrollError, match=message):
        enroll(fresh.url, TOKEN, tmp_path / "agent", ca_file=fresh.ca_pem, **kwargs)
    assert fresh.received == []


def test_join_refuses_a_wrapped_key_that_is_not_the_gateway_key(
    fresh: FakeRelay, tmp_path: Path, cluster: dict[str, Any]
) -> None:
    other = GatewayKeyPair.generate().public_text()
    fresh.gateway = cluster["gateway"] | {"hpke_public_key": other}
    with pytest.raises(EnrollError, match="does not match the gateway's public key"):
        enroll(
            fresh.url,
            TOKEN,
            tmp_path / "agent",
            ca_file=fresh.ca_pem,
            join=True,
            recovery_key=cluster["text"],
        )
    fresh.gateway = cluster["gateway"] | {"members": 10}
    with pytest.raises(EnrollError, match="10 members, the maximum"):
        enroll(
            fresh.url,
            TOKEN,
            tmp_path / "agent",
            ca_file=fresh.ca_pem,
            join=True,
            recovery_key=cluster["text"],
        )


def test_cli_prints_a_generated_recovery_key_once(fresh: FakeRelay, tmp_path: Path) -> None:
    args = ["enroll", "--relay", fresh.url, "--token", TOKEN, "--ca-file", str(fresh.ca_pem)]
    result = CliRunner().invoke(app, [*args, "--config-dir", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    keys = re.findall(r"bhrk_[0-9A-Z-]+", result.stdout)
    assert len(keys) == 1
    assert "never shown again" in result.stdout
    assert keys[0] not in result.stderr
    assert keys[0].encode() not in _all_bytes(tmp_path / "a")

    _, text = recovery.generate()
    given = [*args, "--config-dir", str(tmp_path / "b"), "--recovery-key", text]
    result = CliRunner().invoke(app, given)
    assert result.exit_code == 0, result.output
    assert "bhrk_" not in result.output and "never shown again" not in result.output


def test_target_ca_file_must_be_a_pem_ca_before_anything_happens(tmp_path: Path) -> None:
    bad = tmp_path / "corp-root.pem"
    bad.write_text("not a certificate\n")
    config_dir = tmp_path / "cfg"
    with pytest.raises(EnrollError, match=r"--target-ca-file .* is not a PEM CA certificate"):
        enroll("https://relay.invalid", "bhe_x", config_dir, target_ca_file=bad)
    with pytest.raises(EnrollError, match=r"--target-ca-file .* does not exist"):
        enroll("https://relay.invalid", "bhe_x", config_dir, target_ca_file=tmp_path / "no")
    assert not config_dir.exists()
